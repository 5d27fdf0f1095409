"""Command-line pieces shared by the scripts: the checkpoint arguments, the device, the
mask-generation options, image-path lists, counts, output paths and the log.

A mistake the user can fix (a count of 0, a missing image, a file where a folder goes, a
checkpoint that cannot be had) ends a script with one line saying so, before any long work, not
with a traceback or after it."""

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .amg import AMGConfig
from .checkpoints import MODEL_TYPE_CHOICES, CheckpointError, require_checkpoint_pair, resolve_checkpoint
from .cpu import CPU_TARGETS, NATIVE, cpu_target_problem
from .fast import PackageMismatch
from .modes import Mode, compiles, mode_config
from .preprocess import ImageTooLarge, InvalidImage, read_image_file
from .protocol import first_line, json_text
from .stops import end_as_stopped, stopped_by, take_over_stops

# The mask-generation options a user may set; each is an AMGConfig field of the same name.
AMG_OPTIONS = {
    "points_per_side": (int, "points along each side of the prompt grid"),
    "points_per_batch": (int, "point prompts per mask-decoder call "
                         "(default: the mode's, 64; fast modes 1024 on CUDA, fewer on a GPU "
                         "too small for them; on a CPU 64, or 8 where a fast mode runs compiled or exported "
                         "kernels)"),
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


class HelpWithDefaults(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, where it has one to show (not None, not a flag's off),
    and the description (a script's docstring, with its example commands) as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class ScriptParser(argparse.ArgumentParser):
    """The scripts' parser: --help with defaults, and a shortened option that names one option
    (`--crop` for --crop-n-layers) taken as that option, where argparse would call it ambiguous
    because it matches both spellings add_option gives it; one that names several lists each once."""

    def __init__(self, **options) -> None:
        super().__init__(**{"formatter_class": HelpWithDefaults, **options})

    def _get_option_tuples(self, option_string: str) -> list[tuple]:
        matches = super()._get_option_tuples(option_string)
        actions = [match[0] for match in matches]
        return [match for index, match in enumerate(matches) if match[0] not in actions[:index]]


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


def checkpoint_from_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, str]:
    """(checkpoint file, model type) the arguments name, downloaded if missing (run_script turns
    a failure into its reason)."""
    check_checkpoint_arguments(parser, args)
    return resolve_checkpoint(args.checkpoint_dir, args.model_type)


def run_script(main: Callable[[], None]) -> None:
    """Runs a script's main: a checkpoint that cannot be had or used ends it with one line
    saying why and what to do, not a traceback; so does a stop, Ctrl-C or SIGTERM (what was
    printed stays; a time limit such as `timeout` sends SIGTERM). A second SIGTERM, while the
    first one's clean-up runs (temporary folders, a loader's tryout, a Ray instance), ends the
    process at once."""
    take_over_stops()
    try:
        main()
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    except KeyboardInterrupt as stop:
        print(f"stopped ({stopped_by(stop)})", file=sys.stderr)
        end_as_stopped(stopped_by(stop))


def number_type(kind: type, what: str, within: Callable[[float], bool], rule: str) -> Callable[[str], float]:
    """An argparse type: text read as `kind` ("expected {what}" otherwise), kept where `within`
    holds ("must be {rule}" otherwise)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not within(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


# Counts (images, rounds, steps, clients); seeds and step numbers; rates and scales.
positive_int = number_type(int, "a whole number", lambda value: value >= 1, "1 or more")
non_negative_int = number_type(int, "a whole number", lambda value: value >= 0, "0 or more")
# Seeds torch.manual_seed takes (a larger one ended in a traceback), as a signed 64-bit number.
seed = number_type(int, "a whole number", lambda value: 0 <= value < 2**63, f"0 to {2**63 - 1}")
non_negative_float = number_type(float, "a number", lambda value: 0 <= value < math.inf, "a finite number, 0 or more")
# A time to wait on a thread: Python's waits end in an OverflowError past threading.TIMEOUT_MAX.
seconds = number_type(float, "a number of seconds", lambda value: 0 < value <= threading.TIMEOUT_MAX,
                      f"above 0 and at most {threading.TIMEOUT_MAX:.0f} (about 292 years)")


def read_images(parser: argparse.ArgumentParser, paths: list[str]) -> list[tuple[str, np.ndarray]]:
    """(path, RGB array) of each image file; one that is missing or not an image is a usage error
    naming it."""
    images = []
    for path in paths:
        try:
            images.append((path, read_image_file(path)))
        except OSError as error:
            parser.error(f"{path}: {error.strerror or error}")
        except (InvalidImage, ImageTooLarge) as error:
            parser.error(f"{path}: {error}")
    return images


def require_output_folder(parser: argparse.ArgumentParser, path: str | Path, option: str) -> Path:
    """An output folder that can be made (or exists): checked before the work whose results it
    will hold, made only when they are written. An empty one (an unset variable, say) is refused,
    not read as the current folder."""
    if not str(path).strip():
        parser.error(f"{option}: empty; give a folder (. for the current one)")
    path = Path(path).expanduser()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                parser.error(f"{option} {path}: {folder} is a file, not a folder")
            require_writable_folder(parser, folder, f"{option} {path}")
            break
    return path


def require_writable_folder(parser: argparse.ArgumentParser, folder: Path, what: str) -> None:
    """A file can be made in the folder: tried, since os.access says yes to root everywhere (and
    to folders such as /proc, where nothing can be made)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        parser.error(f"{what}: {folder} is not writable (a file made there failed: {error.strerror or error})")


def require_output_file(parser: argparse.ArgumentParser, path: str | Path, option: str,
                        folder_made: bool = False, inputs: Iterable[str | Path] = ()) -> Path:
    """An output file that can be written: not a folder, not one of the inputs (the paths file
    given twice, or the arguments swapped, was replaced by the answers), in a folder that exists
    (or, where the script makes it, folder_made, one that can be made)."""
    if not str(path).strip():
        parser.error(f"{option}: empty; give a file")
    path = Path(path).expanduser()
    if path.is_dir():
        parser.error(f"{option} {path}: a folder; give the file to write the lines to")
    if any(path.resolve() == Path(given).expanduser().resolve() for given in inputs):
        parser.error(f"{option} {path}: that is an input file; the output would replace it")
    if folder_made:
        require_output_folder(parser, path.parent, option)
    elif not path.parent.is_dir():
        parser.error(f"{option} {path}: the folder {path.parent} does not exist")
    else:
        require_writable_folder(parser, path.parent, f"{option} {path}")  # the file is written beside, then renamed
    return path


def require_one_fast_folder(parser: argparse.ArgumentParser, save_fast: str | None, load_fast: str | None,
                            compile_mode: str | None = None) -> None:
    """--save-fast or --load-fast, not both, each a folder's name (an empty one is no folder);
    --load-fast's a folder that exists, found before any long work (a checkpoint's download, a
    study's other rows); neither with --compile-mode, which they would leave unused."""
    if save_fast is not None and load_fast is not None:
        parser.error("give --save-fast or --load-fast, not both")
    if compile_mode and (save_fast is not None or load_fast is not None):
        parser.error("give --compile-mode or --save-fast/--load-fast, not both: they export kernels with "
                     "AOTInductor, or load them, and compile nothing with torch.compile")
    if save_fast == "" or load_fast == "":
        parser.error("--save-fast and --load-fast take a folder")
    if load_fast is not None and not Path(load_fast).is_dir():
        parser.error(f"--load-fast {load_fast}: no such folder" + (" (a file)" if Path(load_fast).exists() else ""))


def add_cpu_target_option(parser: argparse.ArgumentParser, help: str) -> None:
    add_option(parser, "cpu_target", choices=[NATIVE, *CPU_TARGETS], default=NATIVE, help=help)


def require_cpu_target(parser: argparse.ArgumentParser, cpu_target: str, save_fast: str | None) -> None:
    """--cpu-target only with --save-fast (it says what exported kernels are compiled for), and
    only a level that this torch compiles for and this CPU runs (what is exported is served here)."""
    if cpu_target == NATIVE:
        return
    if save_fast is None:
        parser.error("--cpu-target goes with --save-fast: it says what the exported kernels are compiled for")
    if problem := cpu_target_problem(cpu_target):
        parser.error(f"--cpu-target {cpu_target}: {problem}")


def listed_as(output: str | Path, paths: list[str]) -> list[str]:
    """The listed images of output's name: those require_output_file compares it with, so that a
    job does not write its lines over one of its images, without resolving a million paths."""
    return [given for given in paths if Path(given).name == Path(output).name]


def write_lines(output: Path, lines: Iterable[str]) -> None:
    """Each line into output.partial, renamed to output after the last: a run that fails or is
    stopped leaves an earlier output as it was, and the lines it wrote in the .partial (it says
    so), or no .partial where it wrote none."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(output.name + ".partial")
    written = 0
    try:
        with partial.open("w") as out:
            for line in lines:
                out.write(line + "\n")
                written += 1
    except BaseException:
        if partial.exists() and partial.stat().st_size == 0:
            partial.unlink()
        elif partial.exists():
            print(f"lines written before the run ended: {written}, in {partial}", file=sys.stderr)
        raise
    partial.replace(output)


def error_of(line: str) -> str | None:
    """The error that an answer line holds (server.py's {"error": ...}), or None (masks)."""
    return json.loads(line).get("error", line) if line.startswith('{"error"') else None


def report_error_lines(paths: list[str], failed: list[tuple[str, str]], output: str | os.PathLike) -> None:
    """After a bulk run, on stderr: the lines written, how many of `paths` answered an error line
    (failed: each one's path and error), which, and the first one's error (where a worker could
    not load its model, every line says why); status 1 when every one did (nothing to compare)."""
    print(f"wrote {len(paths)} line{'' if len(paths) == 1 else 's'} to {output}", file=sys.stderr)
    if failed:
        (first, why), *others = failed[:3]
        print(f"{len(failed)} of {len(paths)} images answered an error line, e.g. {first} ({why})"
              + "".join(f", {path}" for path, _ in others), file=sys.stderr)
    if len(failed) == len(paths):
        sys.exit(1)


def load_failure_line(who: str, error: Exception) -> str:
    """The answer line of every image for a worker whose model did not load (its checkpoint
    missing, kernels exported for something else, memory run out), in one line: a Ray Data
    worker or a Modal container that answers it ends its run with these lines instead of dying,
    which Ray tells its driver without the reason and Modal answers by starting it again."""
    why = error.one_line() if isinstance(error, PackageMismatch) else first_line(error)
    return json_text({"error": f"{who} could not load its model: {type(error).__name__}: {why}"})


def compile_modes() -> list[str]:
    """torch.compile's modes, as this torch names them (choices of --compile-mode)."""
    return sorted(torch._inductor.list_mode_options())


def require_device(parser: argparse.ArgumentParser, device: str) -> None:
    if problem := device_problem(device):
        parser.error(f"--device {device}: {problem}")


def device_problem(device: str, here: bool = True) -> str | None:
    """Why the models cannot run on a device (None where they can): it is the CPU or a CUDA GPU
    (torch names more, such as meta, whose tensors hold no numbers), and with `here`, one this
    machine has."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return "not a torch device; use cpu, cuda or cuda:N"
    if parsed.type not in ("cpu", "cuda") or (parsed.type == "cpu" and parsed.index not in (None, 0)):
        return "not a device the models run on; use cpu, cuda or cuda:N"
    if here and parsed.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available on this machine; use --device cpu"
    if here and parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        return (f"this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """--threads, checked by check_threads once parsed."""
    parser.add_argument("--threads", type=positive_int,
                        help="on a CPU, torch's threads for the model (default: one per core); on cores that other "
                        "work also uses, fewer than the cores the process has to itself (docs/performance.md)")


def check_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads is not None and threads > cores:  # 100000 started as many threads, to no use
        parser.error(f"--threads {threads}: this process may use {cores} cores; give at most {cores}")


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
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{name}: expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None


def amg_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The mask-generation options that are set (points_per_batch may be left to the mode),
    checked: invalid values end with a usage error."""
    options = {name: getattr(args, name) for name in AMG_OPTIONS if getattr(args, name) is not None}
    try:
        AMGConfig(**options)
    except ValueError as error:
        parser.error(in_option_words(error))
    return options


def in_option_words(error: ValueError) -> str:
    """AMGConfig's message for a setting in the words of the option that gave it, as argparse
    says its own ("pred_iou_thresh must be ..." -> "argument --pred-iou-thresh: must be ...")."""
    name, _, rest = str(error).partition(" ")
    return f"argument --{name.replace('_', '-')}: {rest}" if name in AMG_OPTIONS else str(error)


def amg_config(parser: argparse.ArgumentParser, args: argparse.Namespace, mode: Mode) -> AMGConfig:
    """The AMGConfig the options describe for a mode on args.device (a fast mode's points per
    batch depend on whether its kernels are compiled: see modes.compiles)."""
    require_device(parser, args.device)
    try:
        asked = [getattr(args, name, None) for name in ("compile_mode", "save_fast", "load_fast")]
        compiled = compiles(mode, args.device, *asked)
        return mode_config(mode, args.device, compiled, **amg_options(parser, args))
    except ValueError as error:
        parser.error(in_option_words(error))


def error_text(error: Exception) -> str:
    """An error in the words a user reads: a file's error as "path: No such file or directory"
    (Python's own, "[Errno 2] No such file or directory: 'path'", says it in its terms)."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename}: {error.strerror}" if error.filename is not None else error.strerror
    return str(error)


def read_image_paths(paths_file: str | Path) -> list[str]:
    """The paths listed in a file, one per line, as the README's curl command sends them: a name's
    own spaces kept (a file's name may end in one), blank lines and a Windows line ending left
    out. A line ends at a newline alone: str.splitlines also ends one at a form feed or Unicode's
    line separators, which a file's name may hold (its list of answers would not line up)."""
    if not str(paths_file).strip():  # Path("") is the current folder
        raise ValueError("no paths file given (an empty name); give a text file of image paths, one per line")
    if Path(paths_file).is_dir():
        raise ValueError(f"{paths_file} is a folder; give a text file of image paths, one per line")
    try:
        text = Path(paths_file).read_bytes().decode()  # read_text would take a lone "\r" for a line's end
    except UnicodeDecodeError as error:
        raise ValueError(f"{paths_file} is not a text file of image paths, one per line (not UTF-8 at byte "
                         f"{error.start})") from None
    if text.startswith("\ufeff"):  # "UTF-8 with BOM": the first path would start with it
        raise ValueError(f"{paths_file} starts with a byte-order mark (saved as UTF-8 with BOM): save it as "
                         "UTF-8 without one (its first path would begin with the mark)")
    paths = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not paths:
        raise ValueError(f"{paths_file} lists no images")
    return paths


def checked_image_paths(paths_file: str | Path) -> list[str]:
    """read_image_paths, and every listed image decoded once: a missing file or one that is not
    an image ends a run before its first row or its first paid GPU second, with its name."""
    paths = read_image_paths(paths_file)
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        relative = " (relative paths are read from the current folder, " + os.getcwd() + ")" if any(
            not Path(path).is_absolute() for path in missing) else ""
        folders = " (folders are listed, not image files)" if any(Path(path).is_dir() for path in missing) else ""
        raise ValueError(f"{len(missing)} of the {len(paths)} listed images do not exist as files, "
                         f"e.g. {missing[:3]}{relative}{folders}")
    unreadable = []
    for path in tqdm(paths, desc="checking the images", unit="image", disable=None):
        try:
            read_image_file(path)
        except (InvalidImage, ImageTooLarge) as error:
            unreadable.append(f"{path} ({error})")
    if unreadable:
        raise ValueError(f"{len(unreadable)} of the {len(paths)} listed images cannot be read: "
                         + "; ".join(unreadable[:3]))
    return paths


class Sam2ImageChatter(logging.Filter):
    """Drops the INFO lines the sam2 package logs on the root logger for every image ("Computing
    image embeddings for the provided image...", three per image): noise in a server's, a
    benchmark's or a training run's log. Its warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_sam2 = record.name == "root" and f"{os.sep}sam2{os.sep}" in record.pathname
        return not (from_sam2 and record.levelno <= logging.INFO)


def set_up_logging(format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """The scripts' log: INFO and above on stderr, without sam2's per-image lines, nor the
    deprecation warning that sam2's image transforms (torch.jit.script) raise on each start."""
    logging.basicConfig(level=logging.INFO, format=format, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(Sam2ImageChatter())
    warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
