"""Latency and peak-memory measurement, the same way for every mode and device."""

import os
import resource
import threading
import time

import numpy as np
import torch

from .cpu import mallinfo2, on_cpu


def synchronize(device: str) -> None:
    """Waits for queued GPU work, so that a timer stopped afterwards includes it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


class Stopwatch:
    """Wall time of a block, GPU work included: `with Stopwatch(device) as w: ...; w.seconds`."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> "Stopwatch":
        synchronize(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc_info) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self.start


def latency_summary_ms(seconds: list[float]) -> dict[str, float]:
    milliseconds = np.asarray(seconds) * 1000
    return {
        "ms_per_request": float(milliseconds.mean()),
        "p50": float(np.percentile(milliseconds, 50)),
        "p90": float(np.percentile(milliseconds, 90)),
        "p99": float(np.percentile(milliseconds, 99)),
    }


def thread_waits() -> dict[str, int] | None:
    """How long each of this process's threads has waited for a core so far, in nanoseconds:
    runnable, not running (Linux's schedstat). Other work on the cores shows here as time the
    measured code did not get: its figures are then not its own. None where the kernel does not
    say."""
    waits = {}
    try:
        threads = os.listdir("/proc/self/task")
    except OSError:
        return None
    for thread in threads:
        try:
            with open(f"/proc/self/task/{thread}/schedstat") as stats:
                waits[thread] = int(stats.read().split()[1])
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        except (OSError, ValueError, IndexError):
            return None
    return waits


def core_wait_seconds_since(before: dict[str, int] | None) -> float | None:
    """Seconds the threads waited for a core since `before` (thread_waits): each thread's own
    growth (a thread that ended meanwhile took its wait with it: a sum of all threads' waits
    could shrink, and hide the others'), a thread started meanwhile from zero."""
    now = thread_waits()
    if before is None or now is None:
        return None
    return sum(max(0, wait - before.get(thread, 0)) for thread, wait in now.items()) / 1e9


# A run whose threads waited for a core longer than this share of its time is warned of.
CORE_WAIT_WARN_PCT = 10.0


def core_wait_pct(waited_seconds: float, wall_seconds: float, device: str = "cpu") -> float:
    """Seconds waited for a core (core_wait_seconds_since) over wall_seconds, as a share of the
    time of the model's threads, in percent: on a CPU torch's threads; on a GPU the one thread
    that sends it work (divided by torch's CPU threads, a GPU row's wait read a tenth of itself)."""
    threads = torch.get_num_threads() if on_cpu(device) else 1
    return 100 * max(0.0, waited_seconds) / (wall_seconds * threads) if wall_seconds > 0 else 0.0


def reset_peak_memory(device: str) -> None:
    """On CUDA, starts a new peak. On CPU the peak is the process's, since it started."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: str) -> tuple[float, float]:
    """(peak MiB, percent of the device's memory): CUDA memory allocated since the last reset,
    or on CPU this process's peak resident memory."""
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        peak = peak_resident_bytes()
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return peak / 2**20, 100 * peak / total


def peak_resident_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, its own. (getrusage's ru_maxrss is
    not: a process started by another keeps the other's peak, so a study row's process, spawned
    by the study's, read the study's peak.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere; Linux reports KiB


def allocated_mib(device: str) -> float:
    """Memory in use now, in MiB: CUDA memory allocated on the device (its CUDA graphs' pools
    included), or on a CPU what malloc has handed out (allocated_bytes)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device) / 2**20
    return allocated_bytes() / 2**20


def device_description(device: str) -> str:
    """What a benchmark ran on: the GPU's name, or the CPU's thread count (--threads)."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'' if threads == 1 else 's'})"


class PeakMemory:
    """Peak memory of a block, in MiB: CUDA memory allocated (reset at the start), or on a CPU the
    memory malloc has handed out above its level at the start, sampled every 5 ms by a thread.

    On a CPU, memory in use rather than resident memory: the server keeps freed memory for the
    next request (cpu.py), so a process's resident memory stays at the peak of whichever
    request came first, and would show nothing for the requests after it."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.mib = 0.0

    def __enter__(self) -> "PeakMemory":
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            self.start = self.peak = allocated_bytes()
            self.done = threading.Event()
            self.sampler = threading.Thread(target=self.sample, daemon=True)
            self.sampler.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, allocated_bytes())

    def __exit__(self, *exc_info) -> None:
        if self.device.startswith("cuda"):
            synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        else:
            self.done.set()
            self.sampler.join()
            self.mib = (max(self.peak, allocated_bytes()) - self.start) / 2**20


def allocated_bytes() -> int:
    """Bytes malloc has handed out and not taken back (heap and mmap'd blocks; glibc), or the
    resident memory where the C library cannot say."""
    if mallinfo2() is None:
        return resident_bytes()
    info = mallinfo2()()
    return info.uordblks + info.hblkhd


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
