"""Command-line options shared by server.py and reproduce_experiments.py."""

import argparse

import torch

from .amg import AMGConfig
from .modes import Mode, mode_config

# The mask-generation options a user may set; each is an AMGConfig field of the same name.
AMG_OPTIONS = {
    "points_per_side": (int, "points along each side of the prompt grid"),
    "points_per_batch": (int, "point prompts per mask-decoder call "
                         "(default: the mode's, 64; fast modes 1024 on CUDA, fewer on a GPU "
                         "too small for them, 8 on a CPU)"),
    "pred_iou_thresh": (float, "keep masks whose predicted IoU is above this"),
    "stability_score_thresh": (float, "keep masks whose stability score is at least this"),
    "stability_score_offset": (float, "logit offset used to compute the stability score"),
    "box_nms_thresh": (float, "box IoU above which NMS drops the lower-scored mask"),
    "crop_n_layers": (int, "extra layers of image crops to run the grid on (0: whole image only)"),
}


def add_option(parser: argparse.ArgumentParser, name: str, **options) -> None:
    """Adds --some-option and the study's spelling --some_option, both to dest some_option."""
    flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
    parser.add_argument(*flags, dest=name, **options)


def add_amg_options(parser: argparse.ArgumentParser) -> None:
    defaults = AMGConfig()
    for name, (kind, text) in AMG_OPTIONS.items():
        default = None if name == "points_per_batch" else getattr(defaults, name)  # the mode's
        add_option(parser, name, type=kind, default=default, help=text)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")


def amg_config(parser: argparse.ArgumentParser, args: argparse.Namespace, mode: Mode) -> AMGConfig:
    """The AMGConfig the options describe for a mode; invalid values end with a usage error."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")
    try:
        return mode_config(mode, args.device, **{name: getattr(args, name) for name in AMG_OPTIONS})
    except ValueError as error:
        parser.error(str(error))
