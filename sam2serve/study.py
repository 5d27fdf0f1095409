"""The study's own pipeline, run as a peer in benchmarks: the anchor for "ahead of the study".

torchao 0.18 ships the study's modified copy of SAM2 as `torchao._models.sam2`, with its
SAM2AutomaticMaskGenerator (the study's "ao" mode: float32, eager, 64 points per batch). The
wheel lacks that copy's YAML configs, so the model is built from the `sam2` package's configs
with every `_target_: sam2.` pointed at the copy instead; the checkpoint's weights then load
strictly, as for our own model. The copy pins host memory for its copies to the device, so it
runs on CUDA only ("Found no NVIDIA driver" on a CPU): `study_unavailable` says why it cannot
run on a device. It is used by tools/benchmark.py only, never by the server.
"""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

from .amg import AMGConfig, fit_predictor_to_model
from .checkpoints import ModelSize, load_weights
from .rle import RLE

STUDY_PACKAGE = "torchao._models.sam2"
STUDY_ROW = "study_ao"


def study_unavailable(device: str) -> str | None:
    """Why the study's pipeline cannot run on this device, or None if it can."""
    if torch.device(device).type != "cuda":
        return f"{STUDY_PACKAGE} (torchao 0.18) runs on CUDA only: it pins host memory"
    try:
        import torchao._models.sam2.automatic_mask_generator  # noqa: F401
    except ImportError as error:
        return f"{STUDY_PACKAGE} cannot be imported ({error}); it ships with torchao 0.18"
    return None


def retarget(node):
    """A resolved config (dicts and lists) with `_target_: sam2.X` rewritten to the study's copy."""
    if isinstance(node, dict):
        return {
            key: f"{STUDY_PACKAGE}.{value.removeprefix('sam2.')}"
            if key == "_target_" and isinstance(value, str) and value.startswith("sam2.")
            else retarget(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [retarget(value) for value in node]
    return node


def build_study_model(size: ModelSize, checkpoint: str | Path, device: str) -> torch.nn.Module:
    """The study's SAM2 model of that size with the checkpoint's weights (strict), on the device.

    The same composition as sam2's build_sam2 with apply_postprocessing=False (as
    checkpoints.build_model), then the targets rewritten.
    """
    import torchao._models.sam2  # noqa: F401  (its modules must be importable by name)

    config = compose(config_name=size.config, overrides=list(size.overrides))
    OmegaConf.resolve(config)
    model_config = OmegaConf.create(retarget(OmegaConf.to_container(config.model)))
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    model = load_weights(instantiate(model_config, _recursive_=True), state,
                         f"{checkpoint} does not fit the study's SAM2.1 {size.name}")
    return model.to(device).eval()


class StudyMaskGenerator:
    """The study's SAM2AutomaticMaskGenerator (torchao 0.18) with our settings: the study row."""

    def __init__(self, model: torch.nn.Module, config: AMGConfig) -> None:
        from torchao._models.sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        self.config = config
        self.generator = SAM2AutomaticMaskGenerator(model, **asdict(config), output_mode="uncompressed_rle")
        fit_predictor_to_model(self.generator.predictor)  # its feature sizes assume a 1024 input

    def generate(self, image: np.ndarray) -> list[RLE]:
        try:
            records = self.generator.generate(image)
        except ValueError as error:
            # The study's code fails when no mask of an image passes the filters (NMS on an
            # empty nested tensor: "torch.cat(): expected a non-empty list of Tensors").
            if "non-empty list of Tensors" not in str(error):
                raise
            return []
        return [record["segmentation"] for record in records]

    def with_config(self, config: AMGConfig) -> "StudyMaskGenerator":
        return StudyMaskGenerator(self.generator.predictor.model, config)

    def generate_batch(self, images: list[np.ndarray]) -> list[list[RLE]]:
        return [self.generate(image) for image in images]
