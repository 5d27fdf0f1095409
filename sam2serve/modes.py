"""The server's modes, as data: one table read by the server and the experiment driver."""

import logging
import os
import time
from dataclasses import asdict, dataclass

import torch

from .cpu import NATIVE, for_cpu_target, on_cpu, set_up_cpu_process, warn_of_slow_half
from .amg import EAGER_KERNELS, AMGConfig, Generator, MaskGenerator, ReferenceMaskGenerator
from .checkpoints import DOWNLOAD_BASE_URL, LoadedModel, checkpoint_identity, load_model, resolve_checkpoint
from .fast import (
    compile_kernels,
    default_compile_mode,
    fast_kernels,
    half_dtype,
    kernel_spec,
    load_kernels,
    prepare_model,
    save_kernels,
    warm_up,
)
from .interactive import PromptSegmenter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    reference: bool = False  # the sam2 package's own generator instead of the project's
    compiled: bool = False  # kernels compiled or exported ahead of time (sam2serve.fast); see compiles()
    half_precision: bool = False  # float16 on CUDA, bfloat16 on CPU
    # Unless the user sets --points-per-batch (mode_config): read where the mode's kernels are compiled
    # on a GPU (halved to fit); eager kernels take sam2's 64, compiled ones on a CPU CPU_COMPILED_POINTS.
    points_per_batch: int = 64


CPU_COMPILED_POINTS = 8  # on a CPU the compiled decoder is fastest on a few prompts per call

MODES = {
    mode.name: mode
    for mode in [
        Mode("baseline", "the sam2 package's SAM2AutomaticMaskGenerator, the reference", reference=True),
        Mode("ao", "the project's pipeline: same numbers as baseline, less work, fast RLE"),
        Mode("fast", "ao compiled (or exported ahead of time), the whole grid per call, "
             "preprocessing on the device", compiled=True, points_per_batch=1024),
        Mode("fast_furious", "fast in half precision (float16 on CUDA, bfloat16 on CPU)",
             compiled=True, half_precision=True, points_per_batch=1024),
    ]
}
DEFAULT_MODE = "ao"


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]


# Memory of the mask decoder per point prompt on a 1024-pixel model (64x64 image tokens, the
# same decoder for every official size), measured eagerly (tests/test_gpu_kit.py checks it):
# the whole batch of 1024 points takes about 21 GiB in float32 and 10 GiB in half precision.
DECODER_MIB_PER_PROMPT = {False: 21.2, True: 10.1}  # by half_precision
DECODER_MEMORY_SHARE = 0.6  # of the GPU's memory, at most, for one point batch


def gpu_points_per_batch(mode: Mode, gpu_mib: float) -> int:
    """The mode's points per batch, halved until one batch's decoder fits in its share of a GPU
    with gpu_mib of memory (float32 fast mode: 1024 on an 80 GB card, 512 on a 24 GB one)."""
    points = mode.points_per_batch
    while points > 64 and points * DECODER_MIB_PER_PROMPT[mode.half_precision] > DECODER_MEMORY_SHARE * gpu_mib:
        points //= 2
    return points


def compiles(mode: Mode, device: str | torch.device, compile_mode: str | None = None,
             save_fast: str | os.PathLike | None = None, load_fast: str | os.PathLike | None = None) -> bool:
    """Whether a mode's kernels are compiled or exported: a fast mode's always on CUDA; on a CPU
    only when asked for (a compile mode, save_fast or load_fast given). On a CPU the compiled
    kernels lose to ao's eager ones, which skip prompts and size their steps for the cache
    (docs/performance.md), so there a fast mode runs those, in its precision, and says so in
    /health."""
    return mode.compiled and (not on_cpu(device) or bool(compile_mode or save_fast or load_fast))


def mode_config(mode: Mode, device: str, compiled: bool | None = None, **options) -> AMGConfig:
    """AMG settings for a mode on a device: sam2's defaults, the mode's points per batch (eager
    kernels: sam2's 64; compiled: a few on a CPU, as many as fit on a GPU), then `options` (those
    that are None keep their default). `compiled`: whether its kernels will be (default: compiles())."""
    options = {name: value for name, value in options.items() if value is not None}
    if compiled is None:
        compiled = compiles(mode, device)
    if not compiled:
        points = MODES["ao"].points_per_batch
    elif on_cpu(device):
        points = CPU_COMPILED_POINTS
    else:
        points = gpu_points_per_batch(mode, torch.cuda.get_device_properties(device).total_memory / 2**20)
    options.setdefault("points_per_batch", points)
    return AMGConfig(**options)


@dataclass(frozen=True)
class Pipeline:
    """A model loaded for one mode, its generator built (compiled kernels warmed up): what server.py, the
    Modal app, the Ray Serve app and the Ray Data job each run."""

    loaded: LoadedModel
    mode: Mode
    config: AMGConfig
    generator: Generator

    @property
    def runs_prompts(self) -> bool:
        """Whether it answers /embed and /segment: prompts run in float32, so not in half precision."""
        return not self.mode.half_precision

    @property
    def kernels(self) -> str:
        """How the mode's model code runs (GET /health): sam2's own, eager or compiled, in which dtype."""
        kernels = getattr(self.generator, "kernels", None)
        if kernels is None:
            return "sam2's SAM2AutomaticMaskGenerator"
        described = f"{kernels.description}, {str(kernels.dtype).removeprefix('torch.')}"
        if self.mode.compiled and kernels.description == EAGER_KERNELS:
            described += "; compiled kernels are slower on a CPU (--compile-mode compiles them)"
        return described

    @property
    def info(self) -> dict:
        """What GET /health shows (on a CPU with torch's thread count: sam2serve/cpu.py says why it matters)."""
        device = self.loaded.model.device
        threads = {"threads": torch.get_num_threads()} if device.type == "cpu" else {}
        return {"mode": self.mode.name, "model": self.loaded.description, "weights": self.loaded.weights,
                "device": str(device), **threads, "kernels": self.kernels, "prompts": self.runs_prompts,
                "amg": asdict(self.config)}


def prompt_segmenter(pipeline: Pipeline) -> PromptSegmenter | None:
    """What answers /embed and /segment for a pipeline: sam2's predictor on its model, whose
    image ids are bound to the checkpoint's content. None where it runs no prompts (those modes
    answer 501). It shares the pipeline's model, whose mask decoder it sets as sam2 does for
    prompts while it runs: call the two from one thread at a time (the server's worker does)."""
    if not pipeline.runs_prompts:
        return None
    return PromptSegmenter(pipeline.loaded.model, checkpoint_identity(pipeline.loaded.path))


def load_pipeline(
    checkpoint_dir: str | os.PathLike | None = None,
    model_type: str | None = None,
    mode: str = DEFAULT_MODE,
    device: str = "cpu",
    amg: dict | None = None,
    config: AMGConfig | None = None,
    save_fast: str | os.PathLike | None = None,
    load_fast: str | os.PathLike | None = None,
    checkpoint_url: str = DOWNLOAD_BASE_URL,
    batch_size: int = 1,
    compile_mode: str | None = None,
    cpu_target: str = NATIVE,
) -> Pipeline:
    """Checkpoint (the default model without checkpoint_dir and model_type) -> model on the
    device -> generator for the mode. `amg` overrides the mode's settings, or `config` gives them all.
    On a CPU it sets the process up as the server's (sam2serve/cpu.py): denormal floats flushed to
    zero (in the caller's own torch and numpy work too) and freed memory kept for reuse."""
    if amg and config is not None:
        raise ValueError("give amg or config, not both: config holds every setting")
    mode = get_mode(mode)
    set_up_cpu_process(device)  # every mode alike: memory reused, denormals flushed (sam2serve/cpu.py)
    compiled = compiles(mode, device, compile_mode, save_fast, load_fast)
    config = config or mode_config(mode, device, compiled, **(amg or {}))
    path, model_type = resolve_checkpoint(checkpoint_dir, model_type, checkpoint_url)
    loaded = load_model(path, model_type, device)
    log.info("loaded %s (%s); preparing mode %s", loaded.description, loaded.path.resolve(), mode.name)
    warn_of_slow_half(device, mode.half_precision, mode.name)
    generator = build_generator(mode, loaded, config, save_fast=save_fast, load_fast=load_fast,
                                batch_size=batch_size, compile_mode=compile_mode, cpu_target=cpu_target)
    return Pipeline(loaded=loaded, mode=mode, config=config, generator=generator)


def build_generator(
    mode: Mode,
    loaded: LoadedModel,
    config: AMGConfig,
    save_fast: str | os.PathLike | None = None,
    load_fast: str | os.PathLike | None = None,
    batch_size: int = 1,
    compile_mode: str | None = None,
    cpu_target: str = NATIVE,
) -> Generator:
    """The mask generator that runs a mode: eager, or compiled (or exported, or loaded) and warmed
    up (their first runs compile, or load what they need; an eager mode's first request pays only
    its device's own first-call costs).

    save_fast: export the fast kernels into this folder (then serve them), their C++ compiled for
    cpu_target (cpu.CPU_TARGETS; NATIVE: this CPU);
    load_fast: load kernels exported earlier instead of compiling;
    batch_size: the most images per encoder call, which a fast mode's kernels are built for;
    compile_mode: torch.compile's mode (default: max-autotune on CUDA; on a CPU the fast modes run
    eager unless it, save_fast or load_fast is given, and then "default").
    """
    if (save_fast or load_fast) and not mode.compiled:
        raise ValueError(f"saving or loading exported kernels needs a fast mode, not {mode.name!r}")
    if cpu_target != NATIVE and not save_fast:
        raise ValueError(f"a CPU target ({cpu_target}) is for kernels being exported (save_fast)")
    if mode.reference:
        return ReferenceMaskGenerator(loaded.model, config)
    if not compiles(mode, loaded.model.device, compile_mode, save_fast, load_fast):
        if mode.half_precision:
            prepare_model(loaded.model, half_dtype(loaded.model.device))
        return MaskGenerator(loaded.model, config)

    spec = kernel_spec(loaded.model, loaded.path, config, mode.half_precision, batch_size, cpu_target)
    started = time.perf_counter()
    # The model in the kernels' dtype, however they come: the steps that run its own modules
    # (use_m2m's refinement) take the kernels' features.
    prepare_model(loaded.model, spec.torch_dtype)
    if load_fast:
        kernels = load_kernels(load_fast, spec, loaded.model.device)
        how = f"loaded exported kernels{for_cpu_target(kernels.spec.cpu_target)} from {load_fast}"
    elif save_fast:
        save_kernels(loaded.model, spec, save_fast)
        kernels = load_kernels(save_fast, spec, loaded.model.device)
        how = f"exported kernels{for_cpu_target(kernels.spec.cpu_target)} to {save_fast}"
    else:
        compile_mode = compile_mode or default_compile_mode(spec.device)
        kernels = compile_kernels(loaded.model, spec, compile_mode)
        how = f"compiled kernels (torch.compile, mode {compile_mode})"
    generator = MaskGenerator(loaded.model, config, fast_kernels(loaded.model, kernels, how))
    first_runs = warm_up(generator, batch_size)
    log.info("%s: %s, %s, %d points per batch, up to %d images per encoder call; %.1f s in all, of which "
             "the first runs %.1f s", mode.name, how, spec.dtype, spec.points_per_batch, spec.batch_size,
             time.perf_counter() - started, first_runs)
    return generator
