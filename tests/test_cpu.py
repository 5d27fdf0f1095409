"""The CPU process settings (sam2serve/cpu.py), each in a fresh process, set first thing as
server.py does:
- the allocator: a request's large temporaries, freed, serve the next request, on the main
  thread and on another one (a model thread, as in the Ray Serve app); glibc fixes its number of arenas
  when a second thread first allocates;
- denormal floats flushed to zero: on a thread started afterwards and on the threads of its
  parallel operations; the trained micro model's decoder meets them (its sharp attention), and
  flushing them changes no mask."""

import os
import subprocess
import sys

import pytest

from .test_server import REPO

REPEATED_REQUESTS = """
import resource, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from sam2serve.cpu import keep_freed_memory
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
    return [page_faults_of(request) for _ in range(16)]

if sys.argv[2] == "main":
    print(requests())
else:
    with ThreadPoolExecutor(1) as pool:
        print(pool.submit(requests).result())
"""


def fresh_process_output(code: str, *arguments: str) -> str:
    """What `code` prints, run by a fresh Python in the repository."""
    result = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    return result.stdout


def page_faults(allocator: str, thread: str) -> list[int]:
    return [int(count) for count in fresh_process_output(REPEATED_REQUESTS, allocator, thread).strip("[]\n").split(",")]


FREED_THEN_RETURNED = """
import torch
from sam2serve.cpu import keep_freed_memory, return_freed_memory
assert keep_freed_memory()

def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 // 2**20

blocks = [torch.ones(16 * 2**20) for _ in range(12)]  # 12 blocks of 64 MiB, freed: kept in the heap
del blocks
kept = resident_mib()
print(return_freed_memory(1 << 40) == 0, resident_mib() >= kept - 64)  # under the bar: nothing given back
print(return_freed_memory(256 * 2**20) > 700 * 2**20, resident_mib() < kept - 600)
"""


def test_freed_memory_over_a_bar_is_given_back_to_the_system():
    """Kept for the next request's reuse, a burst of large images' freed memory stayed for good
    (7.5 GB a minute after ten uploads of 40 MP): over a bar, it is given back (malloc_trim)."""
    assert fresh_process_output(FREED_THEN_RETURNED).split() == ["True", "True", "True", "True"]


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_large_temporaries_are_reused_without_page_faults(thread):
    # glibc's default: every 4 KiB page of the three blocks (147,000) faults again every time.
    default = page_faults("default", thread)
    assert min(default) > 100_000
    # Kept: the heap grows over the first requests (up to seven, depending on how glibc splits its
    # free space), then serves them (measured in 30 runs: the last eight of the 16 requests fault
    # at most one 256 MiB block in all, 65,536 pages, against about 1.2 million by default).
    kept = page_faults("kept", thread)
    assert sum(kept[-8:]) < sum(default[-8:]) / 4, kept


FLUSHED_ON_EVERY_THREAD = """
import sys
from concurrent.futures import ThreadPoolExecutor
import torch
from sam2serve.cpu import set_up_cpu_process
if sys.argv[1] == "set-up":
    set_up_cpu_process()

def denormal_results():  # 1e-30 * 1e-9 = 1e-39, below float32's smallest normal number
    products = torch.full((1 << 22,), 1e-30) * 1e-9  # large: split over the thread pool
    return int(torch.count_nonzero(products))

with ThreadPoolExecutor(1) as pool:  # a thread started after the set-up, as a model thread
    print(denormal_results(), pool.submit(denormal_results).result())
"""


def test_denormals_are_flushed_on_threads_started_after_the_set_up():
    def nonzero_denormals(set_up: str) -> list[int]:
        return [int(count) for count in fresh_process_output(FLUSHED_ON_EVERY_THREAD, set_up).split()]

    assert nonzero_denormals("none") == [1 << 22, 1 << 22]  # the CPU's default: kept
    assert nonzero_denormals("set-up") == [0, 0]


THREADS_OF_A_MODEL_THREAD = """
import sys
from concurrent.futures import ThreadPoolExecutor
import torch
from sam2serve.cpu import set_up_cpu_process
set_up_cpu_process("cpu", None if sys.argv[1] == "default" else int(sys.argv[1]))
set_up_cpu_process("cpu")  # load_pipeline's call, without a thread count, changes nothing
with ThreadPoolExecutor(1) as pool:  # a model thread started after the set-up
    print(torch.get_num_threads(), pool.submit(torch.get_num_threads).result())
"""


def test_the_thread_count_asked_for_holds_on_threads_started_after_the_set_up():
    default = [int(n) for n in fresh_process_output(THREADS_OF_A_MODEL_THREAD, "default").split()]
    assert default[0] == default[1] >= 1  # torch's own choice: one per core
    assert fresh_process_output(THREADS_OF_A_MODEL_THREAD, "1").split() == ["1", "1"]


FLUSHING_ON_THE_MICRO_MODEL = """
import numpy as np
import torch
from torch.overrides import TorchFunctionMode
from sam2serve.amg import AMGConfig, MaskGenerator
from sam2serve.checkpoints import load_model, resolve_checkpoint
from sam2serve.rle import answer_text
from training.scenes import make_scene

torch.set_num_threads(1)  # the flag is per thread: one thread computes everything here

class DenormalSoftmaxWeights(TorchFunctionMode):
    count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") == "softmax":
            DenormalSoftmaxWeights.count += int(((out != 0) & (out.abs() < torch.finfo(out.dtype).tiny)).sum())
        return out

path, model_type = resolve_checkpoint(None, None)
generator = MaskGenerator(load_model(path, model_type, "cpu").model, AMGConfig(points_per_side=8))
image = make_scene(np.random.default_rng(3), 300, 380).image
with torch.inference_mode():
    with DenormalSoftmaxWeights():
        kept = generator.generate(image)
    assert torch.set_flush_denormal(True)
    flushed = generator.generate(image)
print(DenormalSoftmaxWeights.count, len(kept), answer_text(kept) == answer_text(flushed))
"""


def test_flushing_denormals_changes_no_mask_of_the_micro_model():
    denormal_weights, masks, same = fresh_process_output(FLUSHING_ON_THE_MICRO_MODEL).split()
    assert int(denormal_weights) > 1000  # the decoder's attention meets them (91,636 here)
    assert int(masks) >= 5 and same == "True"


@pytest.mark.parametrize("instructions", [False, True])
def test_a_half_precision_mode_on_a_cpu_without_bfloat16_instructions_is_warned_of(monkeypatch, caplog, instructions):
    from sam2serve import cpu
    from sam2serve.modes import load_pipeline

    monkeypatch.setattr(cpu, "has_bfloat16_instructions", lambda: instructions)
    for mode in ("ao", "fast_furious"):
        load_pipeline(mode=mode, amg={"points_per_side": 2})
    warnings = [record.getMessage() for record in caplog.records if "no bfloat16 instructions" in record.getMessage()]
    assert warnings == ([] if instructions else [
        "this CPU has no bfloat16 instructions (AVX-512 bf16 or AMX): fast_furious runs in emulated bfloat16, "
        "several times slower than ao here; serve ao instead"])
    cpu.warn_of_slow_half("cuda", True, "fast_furious")  # float16 on CUDA: not this CPU's concern
    assert len([r for r in caplog.records if "no bfloat16 instructions" in r.getMessage()]) == len(warnings)



def test_bfloat16_instructions_are_avx512_bf16_or_amx(monkeypatch):
    """Either of AVX-512 bf16 and AMX multiplies bfloat16 in hardware (an AMD EPYC may have the
    one alone); neither: emulated, warned of; a torch that cannot tell: no warning."""
    import torch

    from sam2serve import cpu

    for avx512_bf16, amx, expected in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx512_bf16=avx512_bf16: avx512_bf16, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx, raising=False)
        assert cpu.has_bfloat16_instructions() is expected, (avx512_bf16, amx)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu.has_bfloat16_instructions() is True


def test_a_process_that_runs_the_model_on_a_gpu_keeps_its_cpu_settings(monkeypatch):
    """set_up_cpu_process on a GPU device changes nothing of the process: no allocator setting,
    no denormal flushing, its thread count as it was."""
    import torch

    from sam2serve import cpu

    changed = []
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: changed.append("allocator"))
    monkeypatch.setattr(cpu, "flush_denormals", lambda: changed.append("denormals"))
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: changed.append(threads))
    for device in ("cuda", "cuda:1"):
        cpu.set_up_cpu_process(device, threads=1)
    assert changed == []
    cpu.set_up_cpu_process("cpu", threads=3)
    assert changed == ["allocator", "denormals", 3]
