"""The CPU allocator setting: a request's large temporaries, freed, serve the next request."""

import resource

import torch

from sam2serve.allocator import keep_freed_memory


def page_faults_of(action) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    action()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def request() -> float:
    """A few large temporaries alive together (256, 256 and 64 MiB), as in a decoder step."""
    x = torch.ones(64 * 2**20)
    y = x * 2
    z = torch.ones(16 * 2**20)
    return float(y[0] + z[0])


def test_large_temporaries_are_reused_without_page_faults():
    assert keep_freed_memory()  # glibc on Linux, as on every machine the project runs on
    faults = [page_faults_of(request) for _ in range(8)]
    # glibc's default: about 147,000 page faults every time (each 4 KiB page of the three
    # blocks, mmap'd and returned on every request). Kept: the heap grows for a few requests,
    # then the same memory serves each one.
    assert max(faults[-3:]) < 1000, faults
