"""The fast modes' kernels, built from outside the recipe: ao's MaskGenerator, handed compiled
or exported kernels instead of its eager ones.

The kernels are the eager modules ao runs (model.ImageEncoder and model.FactoredPointDecoder,
whose reference is sam2's own decoder, model.PointDecoder), made fast in one of two ways:
- compiled in the process: torch.compile, full graph, static shapes (every point batch is
  padded to points_per_batch) except the encoder's batch of images (1 to the server's
  --batch-size), max-autotune on CUDA;
- exported ahead of time: torch.export + AOTInductor packages written by `save_kernels` into a
  folder with a manifest of what they were built for, and loaded by `load_kernels` in seconds
  instead of compiling. A package that does not fit (another model, image size, dtype, points
  per batch, batch size, multimask setting, device, GPU architecture or torch version:
  KernelSpec) is refused with a message that says what differs; so is one whose files are not
  those its manifest lists (an export cut short, or a damaged copy), and one that torch cannot
  load here, tried first in a process of its own (its loader can crash the process that calls
  it: a package compiled on a CPU with instruction sets this one lacks does, and the message
  names them; KernelSpec.cpu_target compiles for an x86-64 level instead, which any CPU of
  that level loads). A loaded package unpacks into a temporary folder that torch removes when it
  is freed; those still held when the process exits (a server's threads hold them) are freed at
  exit.
Half precision (fast_furious) is float16 on CUDA, bfloat16 on CPU (where float16 is slow); what
stays float32 stays exact (no TF32: that switch is global and would change the float32 modes in
the same process, the baseline among them). Images are resized and normalised on the device in
every fast mode. `fast_kernels` wraps a pair for MaskGenerator: point batches padded to the
static size, images encoded at most batch_size at a time, outputs copied out of CUDA graphs.
"""

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base

from .amg import AMGConfig, Kernels, MaskGenerator
from .checkpoints import checkpoint_identity, file_sha256
from .cpu import (
    CPU_TARGETS, NATIVE, X86_64_V3, aoti_cpu_options, cpu_target_problem, instruction_sets, instruction_sets_missing,
)
from .model import FactoredPointDecoder, ImageEncoder
from .preprocess import ImageToInputOnDevice

log = logging.getLogger(__name__)
LOADED_PACKAGES: weakref.WeakSet = weakref.WeakSet()  # freed at exit, see free_loaded_packages

MANIFEST = "manifest.json"
ENCODER_PACKAGE = "image_encoder.pt2"
DECODER_PACKAGE = "point_decoder.pt2"


def half_dtype(device: torch.device) -> torch.dtype:
    """The half-precision type that is fast on the device."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass(frozen=True)
class KernelSpec:
    """What a pair of kernels is built for. A saved package is loaded only where all match but
    the CPU they were compiled for, which load_kernels weighs with a tryout (cpu.py)."""

    checkpoint: str  # file name and the start of its SHA-256: exported packages embed the weights
    image_size: int
    dtype: str
    points_per_batch: int
    batch_size: int
    multimask_output: bool
    device: str  # "cuda" or "cpu"
    gpu_architecture: str  # on CUDA, the GPU's ("sm_90"): its code is built for it; "" on a CPU
    cpu_target: str  # the CPU their C++ is compiled for: "native" (the exporting CPU's) or an x86-64 level
    cpu_instruction_sets: str  # the instruction sets it may use: the exporting CPU's or the level's (cpu.py)
    torch_version: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def differences(self, other: "KernelSpec") -> list[str]:
        """Why kernels built for `other` cannot run where this spec is, one line per field that
        differs (the CPU they were compiled for aside: another CPU may run them)."""
        return [
            f"{f.name}: package {getattr(other, f.name)!r}, server {getattr(self, f.name)!r}"
            for f in fields(self)
            if f.name not in CPU_FIELDS and getattr(self, f.name) != getattr(other, f.name)
        ]


CPU_FIELDS = ("cpu_target", "cpu_instruction_sets")


def kernel_spec(
    model: SAM2Base, checkpoint: Path, config: AMGConfig, half_precision: bool, batch_size: int = 1,
    cpu_target: str = NATIVE,
) -> KernelSpec:
    """The spec of kernels for the model and settings; cpu_target: what exported kernels' C++ is
    compiled for (cpu.CPU_TARGETS, or NATIVE: this CPU)."""
    dtype = half_dtype(model.device) if half_precision else torch.float32
    return KernelSpec(
        checkpoint=checkpoint_identity(checkpoint),
        image_size=model.image_size,
        dtype=str(dtype).removeprefix("torch."),
        points_per_batch=config.points_per_batch,
        batch_size=batch_size,
        multimask_output=config.multimask_output,
        device=model.device.type,
        gpu_architecture=gpu_architecture(model.device),
        cpu_target=cpu_target,
        cpu_instruction_sets=instruction_sets() if cpu_target == NATIVE else CPU_TARGETS[cpu_target].instruction_sets,
        torch_version=torch.__version__,
    )


def gpu_architecture(device: torch.device) -> str:
    """The CUDA architecture that the kernels' GPU code is compiled for ("sm_90" on an H100),
    "" on a CPU."""
    if device.type != "cuda":
        return ""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


class PackageMismatch(ValueError):
    """Saved kernels that cannot be used here: built for something else (the message lists what
    differs, a line each), unfinished or damaged."""

    def one_line(self) -> str:
        """The message on one line, for an answer or a table's cell: the lines that say what
        differs joined by "; " after the first ("...built for something else: points_per_batch:
        package 1024, server 64; export them again ...")."""
        first, *rest = [line.strip() for line in str(self).splitlines() if line.strip()] or [""]
        return f"{first} {'; '.join(rest)}".strip()


@dataclass(frozen=True)
class StaticKernels:
    """A compiled or exported pair, for the static shapes of its spec."""

    spec: KernelSpec
    encoder: Callable  # (1 to batch_size, 3, R, R) -> (image_embed, feat_s0, feat_s1)
    decoder: Callable  # (image_embed, feat_s0, feat_s1, coords (points_per_batch, 2)) -> (logits, iou_preds)


def prepare_model(model: SAM2Base, dtype: torch.dtype) -> SAM2Base:
    """Puts the model in the kernels' dtype; the prompt encoder stays float32 (see
    model.decode_points: its Fourier features need the precision)."""
    if dtype != torch.float32:
        model.to(dtype)
        model.sam_prompt_encoder.float()
    return model.eval()


def example_inputs(model: SAM2Base, spec: KernelSpec) -> tuple[tuple, tuple]:
    """Inputs of the static shapes the kernels are built for, for export and warm-up."""
    size = spec.image_size
    images = torch.zeros((spec.batch_size, 3, size, size), dtype=spec.torch_dtype, device=model.device)
    with torch.inference_mode():
        features = ImageEncoder(model)(images[:1])
    coords = torch.full((spec.points_per_batch, 2), size / 2, device=model.device)
    return (images,), (*features, coords)


def point_decoder(model: SAM2Base, spec: KernelSpec) -> FactoredPointDecoder:
    """ao's decoder for static shapes: every prompt of a call in one step, every mask computed
    (skipping prompts would make shapes depend on the data)."""
    return FactoredPointDecoder(model, spec.multimask_output)


def default_compile_mode(device: str) -> str:
    """torch.compile's mode for a device: max-autotune on CUDA, as the study. On CPU the default
    mode: max-autotune's GEMM template search costs minutes there for little gain on these
    small matmuls."""
    return "max-autotune" if torch.device(device).type == "cuda" else "default"


def compile_kernels(model: SAM2Base, spec: KernelSpec, mode: str) -> StaticKernels:
    """torch.compile of both kernels: full graph, static shapes, in torch.compile's `mode`
    (default_compile_mode gives the device's default). max-autotune searches GEMM templates for
    minutes on the large model; "reduce-overhead" keeps its CUDA graphs without the search."""
    model = prepare_model(model, spec.torch_dtype)
    # One eager run first: sam2's position encoding fills a cache on its first call, and code
    # compiled before that guards on the cache being empty, compiling again on the next call.
    example_inputs(model, spec)
    options = dict(mode=mode, fullgraph=True)
    # Batches of images: a batch of another size than the first compiles the encoder once more,
    # then with a dynamic batch dimension (torch.compile's automatic dynamic shapes).
    encoder_dynamic = None if spec.batch_size > 1 else False
    return StaticKernels(
        spec=spec,
        encoder=torch.compile(ImageEncoder(model), dynamic=encoder_dynamic, **options),
        decoder=torch.compile(point_decoder(model, spec), dynamic=False, **options),
    )


def save_kernels(model: SAM2Base, spec: KernelSpec, directory: str | os.PathLike) -> None:
    """Exports both kernels (torch.export + AOTInductor) into `directory`, with a manifest of the
    spec and of each package's SHA-256, written last. A package already there stops being one
    before its files are replaced (its manifest goes first). Their C++ is compiled for
    spec.cpu_target."""
    if problem := cpu_target_problem(spec.cpu_target):
        raise ValueError(f"cannot export kernels for {spec.cpu_target}: {problem}")
    model = prepare_model(model, spec.torch_dtype)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST).exists():
        log.info("replacing the exported kernels in %s", directory)
        (directory / MANIFEST).unlink()
    started = time.perf_counter()
    for name, exported in exported_programs(model, spec):
        with torch.inference_mode(False), torch.no_grad():
            torch._inductor.aoti_compile_and_package(exported, package_path=str(directory / name),
                                                     inductor_configs=aoti_cpu_options(spec.cpu_target))
        log.info("exported %s in %.1f s", directory / name, time.perf_counter() - started)
        started = time.perf_counter()
    # The manifest last: a folder without one is an unfinished export.
    files = {name: file_sha256(directory / name) for name in (ENCODER_PACKAGE, DECODER_PACKAGE)}
    (directory / MANIFEST).write_text(json.dumps({**asdict(spec), "files": files}, indent=2) + "\n")


def exported_programs(model: SAM2Base, spec: KernelSpec) -> Iterator[tuple[str, torch.export.ExportedProgram]]:
    """(package name, program) of both kernels through torch.export, for the model as prepared
    (prepare_model): the encoder takes 1 to batch_size images, the decoder's shapes are static.
    What save_kernels compiles; on fake CUDA tensors, what the tests check of a GPU's kernels."""
    encoder_inputs, decoder_inputs = example_inputs(model, spec)
    images = torch.export.Dim("images", min=1, max=spec.batch_size) if spec.batch_size > 1 else None
    for module, inputs, dynamic_shapes, name in [
        (ImageEncoder(model), encoder_inputs, ({0: images},) if images else None, ENCODER_PACKAGE),
        (point_decoder(model, spec), decoder_inputs, None, DECODER_PACKAGE),
    ]:
        with torch.inference_mode(False), torch.no_grad():
            exported = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
        yield name, exported


def aoti_device_index(device: torch.device | str) -> int:
    """aoti_load_package's device_index: the GPU's number (cuda:1 runs on GPU 1, not on this
    thread's current one), or -1 on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return -1
    return torch.cuda.current_device() if device.index is None else device.index


def load_kernels(directory: str | os.PathLike, spec: KernelSpec, device: torch.device | str = "cpu") -> StaticKernels:
    """Loads kernels saved by save_kernels onto the model's device, refusing a package built for
    something else; their spec is the package's (the CPU it was compiled for among it)."""
    directory = Path(directory)
    again = "export them again for this server with --save-fast"
    if not directory.is_dir():
        raise PackageMismatch(f"{directory} is not a folder of exported kernels (--save-fast writes one)")
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise PackageMismatch(f"{directory} has no {MANIFEST}: not a folder written by --save-fast, or an export "
                              f"that did not finish; {again}")
    try:
        saved = json.loads(manifest.read_text())
        files = saved.pop("files")
        saved.setdefault("cpu_target", NATIVE)  # a manifest from before there were targets: the exporting CPU's
        if not isinstance(files, dict):
            raise TypeError(f"files: {files!r} is not a mapping of package to SHA-256")
        names = set(saved)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # broken JSON, not a mapping
        raise PackageMismatch(f"{manifest} cannot be read ({type(error).__name__}: {error}); {again}") from None
    expected = [f.name for f in fields(KernelSpec)]
    if names != set(expected):  # an older or newer version's manifest
        lacks = [name for name in expected if name not in names]
        unknown = sorted(names - set(expected))
        raise PackageMismatch(f"{manifest} was written by another version of this code, with other fields ("
                              + "; ".join(f"{what}: {', '.join(them)}" for what, them in
                                          [("lacks", lacks), ("unknown", unknown)] if them)
                              + f"); {again}")
    saved = KernelSpec(**saved)
    if differences := spec.differences(saved):
        raise PackageMismatch(
            f"the exported kernels in {directory} were built for something else:\n  "
            + "\n  ".join(differences)
            + f"\n{again}"
        )
    for name in (ENCODER_PACKAGE, DECODER_PACKAGE):
        path = directory / name
        if not path.is_file() or file_sha256(path) != files.get(name):
            raise PackageMismatch(f"{path} is {'missing' if not path.is_file() else 'not the file its manifest lists'}"
                                  f" (a copy cut short, or changed since); {again}")
    packages = [directory / name for name in (ENCODER_PACKAGE, DECODER_PACKAGE)]
    device_index = aoti_device_index(device)
    # Instruction sets the package may use and this CPU does not list (cpu.py): the tryout
    # tells whether the package needs them (its start-up code faults where it does); a list
    # can be short of names the CPU has (an older kernel's, a sandbox's), so it refuses nothing.
    missing = instruction_sets_missing(saved.cpu_instruction_sets, spec.cpu_instruction_sets)
    built_on = "on a CPU" if saved.cpu_target == NATIVE else f"for {saved.cpu_target}"
    other_cpu = (f"compiled {built_on} with {' '.join(missing)}, which this one does not list" if missing else
                 f"compiled {built_on} with instructions this one lacks")
    advice = f"{again} on this machine"
    if saved.cpu_target == NATIVE and spec.cpu_instruction_sets and not instruction_sets_missing(
            X86_64_V3, spec.cpu_instruction_sets):  # a CPU with AVX2: a package for any such CPU would do
        advice += ", or anywhere with --cpu-target x86-64-v3 (for any CPU with AVX2, as this one)"
    if why := load_failure_elsewhere(packages, device_index):
        if why.endswith("(SIGILL)"):  # an illegal instruction
            raise PackageMismatch(f"the exported kernels in {directory} cannot be loaded on this machine: {why}, in "
                                  f"a process of its own that tried first ({other_cpu}); {advice}")
        raise PackageMismatch(f"the exported kernels in {directory} cannot be loaded on this machine (torch "
                              f"{torch.__version__}, {torch.device(device).type}): {why}, in a process of its own "
                              "that tried first; serve without --load-fast and --save-fast (the same kernels, "
                              "compiled with torch.compile at start)")
    if missing:
        log.warning("the exported kernels in %s loaded in a process of their own, but were %s: a kernel that uses "
                    "one would stop the server with an illegal instruction; to be sure, %s",
                    directory, other_cpu, advice)
    try:
        encoder, decoder = [torch._inductor.aoti_load_package(str(path), device_index=device_index) for path in packages]
    except RuntimeError as error:
        why = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise PackageMismatch(f"the exported kernels in {directory} cannot be loaded: {why}; {again}") from error
    LOADED_PACKAGES.update((encoder, decoder))
    return StaticKernels(spec=saved, encoder=encoder, decoder=decoder)  # (the server's spec, but the CPU's fields)


# Loads each package given and frees it at once (which removes the folder it unpacked into).
LOAD_PROBE = """
import sys, torch
for path in sys.argv[2:]:
    torch._inductor.aoti_load_package(path, device_index=int(sys.argv[1]))
"""
LOAD_PROBE_TIMEOUT_S = 600  # a large model's package loads in seconds; a loader that hangs is one that fails


def load_failure_elsewhere(packages: list[Path], device_index: int) -> str | None:
    """Why a separate Python process cannot load the packages, or None if it can. Torch's
    AOTInductor loader can end the process that calls it (a segmentation fault, on an H200
    with torch 2.11 and CUDA 13), which would take a server down without a word: the loader
    runs here first, where a crash is one more reason to refuse the package. The process
    unpacks into a temporary folder of its own, removed after it (a crash skips torch's own
    clean-up: a copy of the weights per try; torch 2.11 unpacks into /tmp whatever TMPDIR says)."""
    with tempfile.TemporaryDirectory(prefix="sam2-load-probe-") as unpacked:
        try:
            probe = subprocess.run([sys.executable, "-c", LOAD_PROBE, str(device_index), *map(str, packages)],
                                   stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   env={**os.environ, "TMPDIR": unpacked}, timeout=LOAD_PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"torch's loader did not finish within {LOAD_PROBE_TIMEOUT_S} s"
    if probe.returncode == 0:
        return None
    if probe.returncode < 0:
        try:
            name = signal.Signals(-probe.returncode).name
        except ValueError:  # a real-time signal, say
            name = f"signal {-probe.returncode}"
        return f"torch's loader crashed ({name})"
    lines = [line.strip() for line in probe.stderr.splitlines() if line.strip()] or [f"exit status {probe.returncode}"]
    return f"torch's loader failed ({lines[-1][:300]})"


@atexit.register
def free_loaded_packages() -> None:
    """Frees the loaded packages still held at exit. Each unpacked itself into a folder of its
    own in the temporary folder (its code and weights), which torch removes when the package
    is freed; at exit, objects that other threads still hold are not freed, and the folders
    of a server stopped and started again would pile up."""
    for package in list(LOADED_PACKAGES):
        package.loader = None  # the only reference to torch's loader, whose destructor removes the folder


def fast_kernels(model: SAM2Base, kernels: StaticKernels, description: str = "compiled") -> Kernels:
    """A static pair as MaskGenerator's kernels: preprocessing on the device in the kernels'
    dtype, images encoded batch_size at a time, point batches padded to the static size."""
    spec = kernels.spec
    return Kernels(
        prepare_input=ImageToInputOnDevice(spec.image_size, model.device, spec.torch_dtype),
        encoder=ImagesPerCall(kernels.encoder, spec.batch_size),
        decoder=PaddedPointDecoder(kernels.decoder, spec.points_per_batch),
        dtype=spec.torch_dtype,
        points_per_batch=spec.points_per_batch,
        multimask_output=spec.multimask_output,
        description=description,
    )


class ImagesPerCall:
    """An image encoder built for 1 to `images` images per call, for a batch of any size: one
    call per `images` images (never padded). Outputs are copied at once: with max-autotune or
    reduce-overhead on CUDA the kernels run as CUDA graphs, whose outputs the next run overwrites."""

    def __init__(self, encoder: Callable, images: int) -> None:
        self.encoder, self.images = encoder, images

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        calls = [
            tuple(output.clone() for output in self.encoder(images[start : start + self.images]))
            for start in range(0, len(images), self.images)
        ]
        return calls[0] if len(calls) == 1 else tuple(torch.cat(outputs) for outputs in zip(*calls))


class PaddedPointDecoder:
    """A point decoder built for exactly `points` prompts per call, for any number up to that:
    a short batch is padded with its last point and the padding's outputs dropped. Outputs are
    float32 copies (half precision in, CUDA graphs' outputs overwritten by their next run)."""

    def __init__(self, decoder: Callable, points: int) -> None:
        self.decoder, self.points = decoder, points

    def __call__(
        self, image_embed: torch.Tensor, feat_s0: torch.Tensor, feat_s1: torch.Tensor, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(coords)
        if n > self.points:
            raise ValueError(f"the decoder is built for {self.points} points per call, not {n}")
        if n < self.points:
            coords = torch.cat([coords, coords[-1:].expand(self.points - n, 2)])
        low_res_logits, iou_preds = self.decoder(image_embed, feat_s0, feat_s1, coords)
        return low_res_logits[:n].to(torch.float32, copy=True), iou_preds[:n].to(torch.float32, copy=True)


def warm_up(generator: MaskGenerator, images_per_call: int) -> float:
    """Runs the kernels on a blank image, and the encoder on a full batch of them (compiling
    them if needed); returns seconds."""
    started = time.perf_counter()
    size = generator.model.image_size
    blank = np.zeros((size, size, 3), dtype=np.uint8)
    generator.generate(blank)
    if images_per_call > 1:
        with torch.inference_mode():
            generator.embed_batch([blank] * images_per_call)
    return time.perf_counter() - started
