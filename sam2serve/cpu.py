"""Process settings for serving on a CPU: memory a request frees is kept for the next one,
denormal floats are read and written as zero, and torch's thread count is set where asked.
`set_up_cpu_process` applies them; server.py calls it first thing, before the process starts any
thread, and load_pipeline again; the benchmark and the study's rows too, so that they measure what
the server runs.

Freed memory. On a CPU, tensors live in plain malloc'd memory. glibc serves an allocation above
its mmap threshold (at most 32 MB by default) with fresh pages from the kernel and hands them
back when it is freed, so every request page-faults its large temporaries in again, each page
zeroed by the kernel: 1.3 to 1.9 million page faults (5 to 7 GB touched) per ao request of the
tiny model on a 512x512 photo, and a large and varying part of its time (docs/performance.md,
"The same request again"). With both thresholds raised, freed blocks stay in the heap and the
next request reuses them: the process keeps its peak resident memory between requests instead.
One arena for every thread: glibc gives threads other than the main one arenas of their own,
whose heaps hold no block over 64 MiB, so a model run on another thread (the Ray Serve app's,
`InferenceWorker.start`'s) would still get its large blocks from the kernel each time.

Denormals. A trained decoder's attention is sharp: many softmax weights fall below float32's
smallest normal number (1.2e-38), and x86 cores take a slow path for every product that reads
or writes such a number. On the micro model, one matrix product of the decoder took 8.5 ms with
them and 2.2 ms flushed, and ao's whole request 850 ms instead of 1180 (docs/performance.md,
"Denormal floats"). Flushing changes values below 1.2e-38 only: no mask changes
(tests/test_cpu.py). The setting is per thread (the x86 MXCSR register) and a thread inherits it
from the thread that starts it, so it is set before the process starts threads: the thread pool
of parallel operations and any model thread then have it too.

Threads. torch runs a parallel operation on one thread per core by default, and its threads
wait for each other at the end of every operation (thousands per request). Where other work
keeps a core busy, the thread that shares that core holds the others up at each of those waits:
on 2 cores with one busy process beside the server, the default model's request took 8.8 to 10.4 s
instead of 1.0 to 1.2, and 1.7 to 1.8 s with one thread (docs/performance.md, "Other work on the same cores").
So a server on cores it shares is started with fewer threads than the cores it has to itself
(server.py --threads).

bfloat16 (fast_furious on a CPU) is fast only on cores with bfloat16 instructions (AVX-512 bf16
or AMX); elsewhere oneDNN emulates it and the mode is several times slower than ao
(docs/performance.md, "bfloat16 on a CPU without bfloat16 instructions"): `warn_of_slow_half`
says so when such a mode is loaded.

Instruction sets. AOTInductor compiles an exported package's C++ (a CPU's kernels, a GPU's host
code) with -march=native: the package may use every instruction set of the CPU it was built on.
A package made on a CPU with AVX-512 faults with an illegal instruction (SIGILL) as it loads on
one without (its start-up code uses AVX-512 too: seen under qemu emulating an AVX2 CPU), and a
CPU short of a set that only a kernel uses would fault at the first image. `instruction_sets`
names a CPU's sets as Linux lists them, for the package's manifest (fast.KernelSpec);
fast.load_kernels names those the loading CPU does not list, when the package's tryout crashes
or, if it loads, in a warning. An export can be compiled for an x86-64 level instead
(`CPU_TARGETS`, server.py --cpu-target): x86-64-v3 loads on any CPU with AVX2 and its companions
(Intel's cores since Haswell, AMD's since Zen), as kernels meant to be copied to other machines (a
cloud's, a cluster's) should.
"""

import ctypes
import functools
import logging
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameters (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_BELOW_BYTES = 1 << 30  # allocations up to 1 GiB come from (and go back to) the heap


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """This process's C library where it is glibc on Linux, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


class MallInfo2(ctypes.Structure):
    """glibc's mallinfo2(): the heap's figures, in bytes (fordblks: its free blocks)."""

    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def mallinfo2() -> Callable[[], MallInfo2] | None:
    """glibc's mallinfo2, or None where there is none (not glibc, or glibc older than 2.33)."""
    function = getattr(glibc(), "mallinfo2", None)
    if function is not None:
        function.restype = MallInfo2
    return function


def return_freed_memory(above_bytes: int) -> int:
    """The heap's free blocks given back to the system (malloc_trim) where they hold more than
    above_bytes: kept for the next request's reuse, a burst of large images left them held for
    good (7.5 GB a minute after ten uploads of 40 MP, where a request needs one). The bytes free
    before, or 0 where nothing was given back (no mallinfo2)."""
    if mallinfo2() is None:
        return 0
    free = mallinfo2()().fordblks
    if free <= above_bytes:
        return 0
    glibc().malloc_trim(0)
    return free


@functools.cache  # once per process
def keep_freed_memory() -> bool:
    """One arena for every thread, and glibc's mmap and trim thresholds raised, for this
    process; False where the C library is not glibc (nothing is changed there)."""
    libc = glibc()
    if libc is None:
        return False
    done = all(libc.mallopt(parameter, value) for parameter, value in [
        (M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, KEEP_BELOW_BYTES), (M_TRIM_THRESHOLD, KEEP_BELOW_BYTES)])
    if done:
        log.info("CPU allocator: one heap for all threads, freed blocks up to %d MiB kept for reuse (glibc mallopt)",
                 KEEP_BELOW_BYTES >> 20)
    return done


def flush_denormals() -> bool:
    """Denormal floats read and written as zero on this thread and the threads it starts from now
    on; False where the CPU has no such mode (nothing is changed there)."""
    flushed = torch.set_flush_denormal(True)
    if flushed:
        say_denormals_flushed()
    return flushed


@functools.cache  # said once per process, though the server and its pipeline each set it
def say_denormals_flushed() -> None:
    log.info("CPU floats: denormals flushed to zero")


def on_cpu(device: str | torch.device) -> bool:
    """Whether a device is the CPU ("cpu", "cpu:0", ...)."""
    return torch.device(device).type == "cpu"


def set_up_cpu_process(device: str | torch.device = "cpu", threads: int | None = None) -> None:
    """The settings, for this process, where it runs the model on a CPU (nothing for other
    devices): call before it starts threads. threads: torch's threads for parallel operations
    (None: as they are, one per core unless set before)."""
    if not on_cpu(device):
        return
    keep_freed_memory()
    flush_denormals()
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("CPU threads: %d for the model's parallel operations", threads)


def has_bfloat16_instructions() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware: AVX-512 bf16 or AMX, as torch reads the
    CPU's features (oneDNN's own "bf16 supported" answers yes for any AVX-512 core, where it
    emulates bfloat16); True where this torch cannot tell."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if None in checks:
        return True
    return any(check() for check in checks)


def warn_of_slow_half(device: str | torch.device, half_precision: bool, mode_name: str) -> None:
    """A warning, when a half-precision mode is loaded on a CPU without bfloat16 instructions."""
    if half_precision and on_cpu(device) and not has_bfloat16_instructions():
        log.warning("this CPU has no bfloat16 instructions (AVX-512 bf16 or AMX): %s runs in emulated bfloat16, "
                    "several times slower than ao here; serve ao instead", mode_name)


# /proc/cpuinfo's names of the x86 extensions that gcc's -march=native lets it emit in plain code
# (families by prefix; pni is SSE3, abm LZCNT, lahf_lm SAHF, 3dnowprefetch PREFETCHW). The other
# flags vary between machines of one CPU (the kernel's, the hypervisor's) or name instructions
# that code reaches only through intrinsics (AES, SHA, AMX, ...), which the packages do not use.
X86_CODE_EXTENSIONS = ("avx", "sse", "fma", "bmi", "pni", "ssse3", "f16c", "popcnt", "movbe", "gfni", "abm", "xop",
                       "tbm", "cx16", "lahf_lm", "3dnowprefetch", "apx")
# An ARM CPU's "Features" that name no instructions a compiler emits: the kernel's event stream
# and CPUID emulation; pointer authentication and BTI, whose instructions are no-ops without them.
ARM_NOT_CODE = {"evtstrm", "cpuid", "paca", "pacg", "bti"}


@functools.cache
def instruction_sets(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """This CPU's instruction sets as Linux names them, sorted, a space between: the x86
    extensions of its "flags" that compiled code can use, or an ARM CPU's "Features" less those
    that are not instructions; "" where the system does not say (not Linux)."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return " ".join(sorted({flag for flag in value.split() if flag.startswith(X86_CODE_EXTENSIONS)}))
        if key.strip() == "Features":
            return " ".join(sorted(set(value.split()) - ARM_NOT_CODE))
    return ""


def instruction_sets_missing(needed: str, here: str) -> list[str]:
    """The instruction sets of `needed` that `here` lacks (both as instruction_sets gives them);
    none where either is unknown (""), as nothing can be checked then."""
    if not needed or not here:
        return []
    return sorted(set(needed.split()) - set(here.split()))


NATIVE = "native"  # exported kernels compiled for the exporting CPU (-march=native), AOTInductor's default


@dataclass(frozen=True)
class CpuTarget:
    """An x86-64 level (gcc's -march=x86-64-vN) that exported kernels are compiled for instead of
    the exporting CPU, so that they load on any CPU of that level."""

    vector_bits: int  # the width of AOTInductor's own vector kernels (its cpp.simdlen): AVX2's 256
    instruction_sets: str  # those the level lets the compiler use, as instruction_sets names them


# x86-64-v4 (AVX-512) is left out: for 512-bit vectors AOTInductor takes the exporting CPU's best
# (AVX-512 VNNI, AMX) beyond the level, and on the micro model it was no faster than x86-64-v3.
X86_64_V3 = "abm avx avx2 bmi1 bmi2 cx16 f16c fma lahf_lm movbe pni popcnt sse sse2 sse4_1 sse4_2 ssse3"
CPU_TARGETS = {"x86-64-v3": CpuTarget(256, X86_64_V3)}  # Intel's cores since Haswell (2013), AMD's since Zen (2017)


def cpu_target_problem(target: str) -> str | None:
    """Why kernels cannot be exported here for `target` (NATIVE or a CPU_TARGETS level), or None
    if they can: the level must be one this torch can compile for, on an x86-64 CPU that has its
    sets (the export is loaded and served where it is made, so it must run there too)."""
    if target == NATIVE:
        return None
    if target not in CPU_TARGETS:
        return f"unknown CPU target {target!r} (one of {NATIVE}, {', '.join(CPU_TARGETS)})"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{target} is an x86-64 level, and this machine is {platform.machine()}"
    import torch._inductor.config as inductor_config  # (its import takes a while: here, only when asked)

    if not hasattr(inductor_config.cpp, "march"):
        return (f"torch {torch.__version__} compiles exported kernels for the exporting CPU only (its AOTInductor has "
                "no cpp.march setting)")
    if missing := instruction_sets_missing(CPU_TARGETS[target].instruction_sets, instruction_sets()):
        return f"this CPU lacks {' '.join(missing)} of {target}, so kernels built for it could not run here"
    return None


def for_cpu_target(target: str) -> str:
    """Words that name the level exported kernels are compiled for (" for x86-64-v3"), none for
    the exporting CPU's own: for /health, the log and the benchmark's table."""
    return f" for {target}" if target != NATIVE else ""


def aoti_cpu_options(target: str) -> dict:
    """AOTInductor's settings (inductor_configs) that compile a package's C++ for `target`."""
    if target == NATIVE:
        return {}
    level = CPU_TARGETS[target]
    return {"cpp.march": target, "cpp.simdlen": level.vector_bits}
