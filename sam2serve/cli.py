"""Command-line pieces shared by the scripts: the checkpoint arguments, the device, the
mask-generation options, and image-path lists."""

import argparse
from pathlib import Path

import torch

from .amg import AMGConfig
from .checkpoints import MODEL_TYPE_CHOICES, require_checkpoint_pair
from .modes import Mode, compiles, mode_config

# The mask-generation options a user may set; each is an AMGConfig field of the same name.
AMG_OPTIONS = {
    "points_per_side": (int, "points along each side of the prompt grid"),
    "points_per_batch": (int, "point prompts per mask-decoder call "
                         "(default: the mode's, 64; fast modes 1024 on CUDA, fewer on a GPU "
                         "too small for them; on a CPU 64, or 8 when compiled)"),
    "pred_iou_thresh": (float, "keep masks whose predicted IoU is above this"),
    "stability_score_thresh": (float, "keep masks whose stability score is at least this"),
    "stability_score_offset": (float, "logit offset used to compute the stability score"),
    "box_nms_thresh": (float, "box IoU above which NMS drops the lower-scored mask"),
    "crop_n_layers": (int, "extra layers of image crops to run the grid on (0: whole image only)"),
    "min_mask_region_area": (int, "remove holes and specks of at most this many pixels of the low-resolution "
                             "mask, 256x256 on official models (sam2's min_mask_region_area; the baseline "
                             "needs sam2's CUDA extension for it)"),
    "use_m2m": (bool, "refine each mask once more with its own logits as mask input (sam2's use_m2m)"),
}
CHECKPOINT_DIR_HELP = ("folder with sam2.1_hiera_<size>.pt (downloaded there if missing); omit it and the model "
                       "type to use the project's trained micro model (models/)")


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one to show (not None, not a flag's off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_option(parser: argparse.ArgumentParser, name: str, **options) -> None:
    """Adds --some-option and the study's spelling --some_option, both to dest some_option."""
    flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **options)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, as_options: bool = False) -> None:
    """CHECKPOINT_DIR and MODEL_TYPE, as positionals (or --checkpoint-dir and --model-type);
    check them with check_checkpoint_arguments."""
    if as_options:
        add_option(parser, "checkpoint_dir", help=CHECKPOINT_DIR_HELP)
        add_option(parser, "model_type", choices=MODEL_TYPE_CHOICES, help="model size")
    else:
        parser.add_argument("checkpoint_dir", nargs="?", help=CHECKPOINT_DIR_HELP)
        parser.add_argument("model_type", nargs="?", choices=MODEL_TYPE_CHOICES, help="model size")


def check_checkpoint_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        require_checkpoint_pair(args.checkpoint_dir, args.model_type)
    except ValueError as error:
        parser.error(str(error))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=default_device(), help="torch device")


def add_amg_options(parser: argparse.ArgumentParser) -> None:
    defaults = AMGConfig()
    for name, (kind, text) in AMG_OPTIONS.items():
        default = None if name == "points_per_batch" else getattr(defaults, name)  # the mode's
        if kind is bool:
            add_option(parser, name, action="store_true", default=default, help=text)
        else:
            add_option(parser, name, type=kind, default=default, help=text)


def option_value(name: str, text: str):
    """A mask-generation option from text (Ray Serve's key=value arguments)."""
    kind = AMG_OPTIONS[name][0]
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    return kind(text)


def amg_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The mask-generation options that are set (points_per_batch may be left to the mode),
    checked: invalid values end with a usage error."""
    options = {name: getattr(args, name) for name in AMG_OPTIONS if getattr(args, name) is not None}
    try:
        AMGConfig(**options)
    except ValueError as error:
        parser.error(str(error))
    return options


def amg_config(parser: argparse.ArgumentParser, args: argparse.Namespace, mode: Mode) -> AMGConfig:
    """The AMGConfig the options describe for a mode on args.device (a fast mode's points per
    batch depend on whether its kernels are compiled: see modes.compiles)."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    try:
        asked = [getattr(args, name, None) for name in ("compile_mode", "save_fast", "load_fast")]
        compiled = compiles(mode, args.device, *asked)
        return mode_config(mode, args.device, compiled, **amg_options(parser, args))
    except ValueError as error:
        parser.error(str(error))


def read_image_paths(paths_file: str | Path) -> list[str]:
    """The paths listed in a file, one per line (blank lines and surrounding spaces ignored)."""
    paths = [line.strip() for line in Path(paths_file).read_text().splitlines() if line.strip()]
    if not paths:
        raise ValueError(f"{paths_file} lists no images")
    return paths
