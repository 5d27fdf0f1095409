"""The fast modes: the ao pipeline with its two kernels compiled or exported ahead of time.

The kernels are the eager modules ao runs (amg.ImageEncoder and decoder.FactoredPointDecoder,
whose reference is sam2's own decoder, decoder.PointDecoder), made fast in one of two ways:
- compiled in the process: torch.compile, full graph, static shapes (every point batch is
  padded to points_per_batch) except the encoder's batch of images (1 to the server's
  --batch-size), max-autotune on CUDA;
- exported ahead of time: torch.export + AOTInductor packages written by `save_kernels` into a
  folder with a manifest of what they were built for, and loaded by `load_kernels` in seconds
  instead of compiling. A package that does not fit (another model, dtype, points per batch,
  device or torch version) is refused with a message that says what differs.
"furious" runs the model in half precision: float16 on CUDA, bfloat16 on CPU (where float16
is slow); what stays float32 stays exact (no TF32: that switch is global and would change
the float32 modes in the same process, the baseline among them). Images are resized and
normalised on the device in every fast mode.
"""

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from sam2.modeling.sam2_base import SAM2Base

from .amg import AMGConfig, ImageEncoder, ImageFeatures, MaskGenerator, split_features
from .decoder import FactoredPointDecoder
from .preprocess import image_to_input_on_device

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ENCODER_PACKAGE = "image_encoder.pt2"
DECODER_PACKAGE = "point_decoder.pt2"


def half_dtype(device: torch.device) -> torch.dtype:
    """The half-precision type that is fast on the device."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass(frozen=True)
class KernelSpec:
    """What a pair of kernels is built for. A saved package is loaded only where all match."""

    checkpoint: str  # file name and the start of its SHA-256: exported packages embed the weights
    image_size: int
    dtype: str
    points_per_batch: int
    batch_size: int
    multimask_output: bool
    device: str  # "cuda" or "cpu"
    torch_version: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def differences(self, other: "KernelSpec") -> list[str]:
        return [
            f"{f.name}: package {getattr(other, f.name)!r}, server {getattr(self, f.name)!r}"
            for f in fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def checkpoint_identity(path: Path) -> str:
    with open(path, "rb") as file:
        digest = hashlib.file_digest(file, "sha256").hexdigest()
    return f"{path.name}#{digest[:16]}"


def kernel_spec(model: SAM2Base, checkpoint: Path, config: AMGConfig, furious: bool, batch_size: int = 1) -> KernelSpec:
    dtype = half_dtype(model.device) if furious else torch.float32
    return KernelSpec(
        checkpoint=checkpoint_identity(checkpoint),
        image_size=model.image_size,
        dtype=str(dtype).removeprefix("torch."),
        points_per_batch=config.points_per_batch,
        batch_size=batch_size,
        multimask_output=config.multimask_output,
        device=model.device.type,
        torch_version=torch.__version__,
    )


class PackageMismatch(ValueError):
    """Saved kernels were built for something else; the message lists what differs."""


@dataclass(frozen=True)
class Kernels:
    spec: KernelSpec
    encoder: Callable  # (B, 3, R, R) -> (image_embed, feat_s0, feat_s1)
    decoder: Callable  # (image_embed, feat_s0, feat_s1, coords (P, 2)) -> (logits, iou_preds)

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype


def prepare_model(model: SAM2Base, spec: KernelSpec) -> SAM2Base:
    """Puts the model in the spec's dtype; the prompt encoder stays float32 (see PointDecoder:
    its Fourier features need the precision)."""
    if spec.torch_dtype != torch.float32:
        model.to(spec.torch_dtype)
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


def compile_kernels(model: SAM2Base, spec: KernelSpec, mode: str | None = None) -> Kernels:
    """torch.compile of both kernels: full graph, static shapes, in torch.compile's `mode`
    (default: default_compile_mode). max-autotune searches GEMM templates for minutes on the
    large model; "reduce-overhead" keeps its CUDA graphs without the search."""
    model = prepare_model(model, spec)
    # One eager run first: sam2's position encoding fills a cache on its first call, and code
    # compiled before that guards on the cache being empty, compiling again on the next call.
    example_inputs(model, spec)
    options = dict(mode=mode or default_compile_mode(spec.device), fullgraph=True)
    # Batches of images: a batch of another size than the first compiles the encoder once more,
    # then with a dynamic batch dimension (torch.compile's automatic dynamic shapes).
    encoder_dynamic = None if spec.batch_size > 1 else False
    return Kernels(
        spec=spec,
        encoder=torch.compile(ImageEncoder(model), dynamic=encoder_dynamic, **options),
        decoder=torch.compile(point_decoder(model, spec), dynamic=False, **options),
    )


def save_kernels(model: SAM2Base, spec: KernelSpec, directory: str | os.PathLike) -> None:
    """Exports both kernels (torch.export + AOTInductor) into `directory`, with a manifest."""
    model = prepare_model(model, spec)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder_inputs, decoder_inputs = example_inputs(model, spec)
    # The encoder takes 1 to batch_size images; the decoder's shapes are static.
    images = torch.export.Dim("images", min=1, max=spec.batch_size) if spec.batch_size > 1 else None
    for module, inputs, dynamic_shapes, name in [
        (ImageEncoder(model), encoder_inputs, ({0: images},) if images else None, ENCODER_PACKAGE),
        (point_decoder(model, spec), decoder_inputs, None, DECODER_PACKAGE),
    ]:
        started = time.perf_counter()
        with torch.inference_mode(False), torch.no_grad():
            exported = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(directory / name))
        log.info("exported %s in %.1f s", directory / name, time.perf_counter() - started)
    # The manifest last: a folder without one is an unfinished export.
    (directory / MANIFEST).write_text(json.dumps(asdict(spec), indent=2) + "\n")


def load_kernels(directory: str | os.PathLike, spec: KernelSpec) -> Kernels:
    """Loads kernels saved by save_kernels, refusing a package built for something else."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise PackageMismatch(f"{directory} has no {MANIFEST}: not a folder written by --save-fast")
    saved = KernelSpec(**json.loads(manifest.read_text()))
    if differences := spec.differences(saved):
        raise PackageMismatch(
            f"the exported kernels in {directory} were built for something else:\n  "
            + "\n  ".join(differences)
            + "\nexport them again for this server with --save-fast"
        )
    device_index = torch.cuda.current_device() if spec.device == "cuda" else -1
    encoder, decoder = [
        torch._inductor.aoti_load_package(str(directory / name), device_index=device_index)
        for name in (ENCODER_PACKAGE, DECODER_PACKAGE)
    ]
    return Kernels(spec=spec, encoder=encoder, decoder=decoder)


class FastMaskGenerator(MaskGenerator):
    """ao's algorithm with compiled or exported kernels, preprocessing on the device, and point
    batches padded to one static size. MaskGenerator's eager kernels are its reference."""

    def __init__(self, model: SAM2Base, config: AMGConfig, kernels: Kernels) -> None:
        if (config.points_per_batch, config.multimask_output) != (
            kernels.spec.points_per_batch, kernels.spec.multimask_output
        ):
            raise ValueError(
                f"kernels built for {kernels.spec.points_per_batch} points per batch and multimask output "
                f"{kernels.spec.multimask_output}, not {config.points_per_batch} and {config.multimask_output}"
            )
        super().__init__(model, config)
        self.kernels = kernels
        self.encoder, self.decoder = kernels.encoder, kernels.decoder

    def with_config(self, config: AMGConfig) -> "FastMaskGenerator":
        """The same kernels under other thresholds (points per batch and multimask output must
        be those the kernels are built for)."""
        return FastMaskGenerator(self.model, config, self.kernels)

    def embed_batch(self, images: list[np.ndarray]) -> list[ImageFeatures]:
        """One encoder call per batch_size images (the kernel's batch dimension is dynamic, up to
        the spec's batch size; never padded)."""
        size = self.kernels.spec.batch_size
        calls = [self.embed_call(images[start : start + size]) for start in range(0, len(images), size)]
        return [features for call in calls for features in call]

    def embed_call(self, images: list[np.ndarray]) -> list[ImageFeatures]:
        size, dtype = self.model.image_size, self.kernels.dtype
        model_input = torch.cat([image_to_input_on_device(image, size, self.device, dtype) for image in images])
        # Copies: with max-autotune or reduce-overhead on CUDA the kernels run as CUDA graphs,
        # whose outputs are overwritten by their next run.
        return split_features([feats.clone() for feats in self.encoder(model_input)])

    def predict_points(
        self, features: ImageFeatures, points: torch.Tensor, crop_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        coords = self.model_coords(points, crop_hw)
        n, size = len(coords), self.kernels.spec.points_per_batch
        if n < size:  # a short last batch: pad with its last point, then drop those outputs
            coords = torch.cat([coords, coords[-1:].expand(size - n, 2)])
        low_res_logits, iou_preds = self.decoder(features.image_embed, *features.high_res_feats, coords)
        return low_res_logits[:n].to(torch.float32, copy=True), iou_preds[:n].to(torch.float32, copy=True)

    def warm_up(self) -> float:
        """Runs the kernels on a blank image, and the encoder on a full batch of them (compiling
        them if needed); returns seconds."""
        started = time.perf_counter()
        blank = np.zeros((self.model.image_size, self.model.image_size, 3), dtype=np.uint8)
        self.generate(blank)
        if self.kernels.spec.batch_size > 1:
            with torch.inference_mode():
                self.embed_batch([blank] * self.kernels.spec.batch_size)
        return time.perf_counter() - started
