"""The CPU allocator setting: a request's large temporaries, freed, serve the next request, on
the main thread and on another one (the server's inference thread). In a fresh process, set
first thing, as server.py does: glibc fixes its number of arenas when a second thread first
allocates."""

import os
import subprocess
import sys

import pytest

from .test_server import REPO

REPEATED_REQUESTS = """
import resource, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from sam2serve.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()  # glibc on Linux, as on every machine the project runs on

def page_faults_of(action):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    action()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def request():  # a few large temporaries alive together (256, 256 and 64 MiB), as in a decoder step
    x = torch.ones(64 * 2**20)
    y = x * 2
    z = torch.ones(16 * 2**20)
    return float(y[0] + z[0])

def requests():
    return [page_faults_of(request) for _ in range(8)]

if sys.argv[2] == "main":
    print(requests())
else:
    with ThreadPoolExecutor(1) as pool:
        print(pool.submit(requests).result())
"""


def page_faults(allocator: str, thread: str) -> list[int]:
    result = subprocess.run([sys.executable, "-c", REPEATED_REQUESTS, allocator, thread], capture_output=True,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return [int(count) for count in result.stdout.strip("[]\n").split(",")]


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_large_temporaries_are_reused_without_page_faults(thread):
    # glibc's default: every 4 KiB page of the three blocks (147,000) faults again every time.
    default = page_faults("default", thread)
    assert min(default) > 100_000
    # Kept: the heap grows over the first requests, then serves most of each one (measured: the
    # last four requests fault 0 to 2 blocks of 256 MiB in all, depending on how glibc splits
    # its free space).
    kept = page_faults("kept", thread)
    assert sum(kept[-4:]) < sum(default[-4:]) / 3, kept
