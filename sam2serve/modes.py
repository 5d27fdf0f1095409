"""The server's modes, as data: one table read by the server and the experiment driver."""

from dataclasses import dataclass

from sam2.modeling.sam2_base import SAM2Base

from .amg import AMGConfig, Generator, MaskGenerator, ReferenceMaskGenerator


@dataclass(frozen=True)
class Mode:
    name: str
    description: str
    reference: bool  # the sam2 package's own generator instead of the project's


MODES = {
    mode.name: mode
    for mode in [
        Mode("baseline", "the sam2 package's SAM2AutomaticMaskGenerator, the reference", reference=True),
        Mode("ao", "the project's pipeline: same numbers as baseline, less work, fast RLE", reference=False),
    ]
}
DEFAULT_MODE = "ao"


def get_mode(name: str) -> Mode:
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; choose one of {sorted(MODES)}")
    return MODES[name]


def build_generator(mode: Mode, model: SAM2Base, config: AMGConfig) -> Generator:
    """The mask generator that runs a mode."""
    generator_class = ReferenceMaskGenerator if mode.reference else MaskGenerator
    return generator_class(model, config)
