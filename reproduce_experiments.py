"""Replay an image list through every mode of the study and write its table, result.csv.

    python reproduce_experiments.py image_paths results/ --checkpoint-dir ~/checkpoints/sam2 --model-type large
    python reproduce_experiments.py image_paths results/ --checkpoint-dir models --model-type micro  # the demo model

Each row (a mode at a batch size and a number of points per batch) runs in a process of its own,
so its peak memory is its own: load the model, warm up on the first image (compilation would
happen there; reported as startup_s, kept out of latency), then every image, timed from the
file's bytes to the RLE lists (disk reads and JSON excluded). Its masks go to
OUTPUT/<row>/rle_masks, one /upload_rle JSON per line, as the server's xargs workflow writes them.
Every row is compared with the baseline row (strict and relaxed mIoU, see compare_rle_lists.py);
the table goes to OUTPUT/result.csv and a plot of ms per request against mIoU to
OUTPUT/result.png, both rewritten after each row. A row already done with the same settings
(the same checkpoint file, options, image paths and bytes, torch, and code: the project's that a
row runs and sam2's version) is not run again: a run stopped part-way resumes where it stopped.
"""

import argparse
import csv
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TypeVar

from sam2serve.stops import end_as_stopped, stop_in_one_line_while_importing, stopped_by, take_over_stops

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the study in one line
    stop_in_one_line_while_importing()

import torch
from matplotlib.figure import Figure
from tqdm import tqdm

from sam2serve.amg import AMGConfig, baseline_leaves_out
from sam2serve.checkpoints import (
    MODEL_TYPE_CHOICES, CheckpointError, checkpoint_identity, ensure_checkpoint, load_model, require_checkpoint_pair,
)
from sam2serve.cli import (
    ScriptParser, add_amg_options, add_device_option, add_option, add_threads_option, amg_config, check_threads,
    checked_image_paths, error_text, require_output_folder, set_up_logging,
)
from sam2serve.compare import compare_results, format_float, settings_changed, summarize
from sam2serve.cpu import set_up_cpu_process
from sam2serve.modes import MODES, build_generator, get_mode
from sam2serve.preprocess import FILE_MAX_PIXELS, decode_image, read_image_file
from sam2serve.rle import answer_text
from sam2serve.timing import (
    CORE_WAIT_WARN_PCT, Stopwatch, core_wait_pct, core_wait_seconds_since, latency_summary_ms, peak_memory_mib,
    reset_peak_memory, thread_waits,
)

log = logging.getLogger("experiments")
PROGRESS_EVERY_S = 60.0  # a row's progress in the log, without a terminal
T = TypeVar("T")

COMPARISON_COLUMNS = ["miou", "relaxed_miou", "mask_count_mismatch", "images", "masks_per_image"]  # compare.py's
RESULT_COLUMNS = [
    "mode", *COMPARISON_COLUMNS, "ms_per_request", "p50", "p90", "p99", "core_wait_pct", "startup_s",
    "max_memory_mib", "max_memory_pct", "batch_size", "points_per_batch", "points_per_side", "model_type", "device",
    "torch_version",
]


@dataclass(frozen=True)
class Row:
    """One line of the study's table, as its settings record it: its mode (the mask generator's
    settings, points per batch included, are the mode's config: the command line's or the mode's
    defaults)."""

    mode: str


# The study's rows, baseline first: every other row is compared with it.
STUDY_ROWS = [Row("baseline"), Row("ao"), Row("fast"), Row("fast_furious")]
BATCH_SIZE = 1  # images per request and per encoder call: every row sends them one at a time, as the study did


def row_name(row: Row, config: AMGConfig) -> str:
    return f"{row.mode}_bs{BATCH_SIZE}_ppb{config.points_per_batch}"


def code_identity() -> str:
    """The start of a SHA-256 of the code a row runs: this script, the project's modules it
    imports (the server's are not among them) and the sam2 package's version. A row measured
    before any of them changed is run again."""
    package = Path(__file__).resolve().parent / "sam2serve"
    files = {Path(__file__).resolve()} | {
        Path(module.__file__).resolve() for module in list(sys.modules.values())
        if getattr(module, "__file__", None) and Path(module.__file__).resolve().parent == package}
    digest = hashlib.sha256(importlib.metadata.version("sam2").encode())
    for path in sorted(files):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def images_identity(paths: list[str]) -> str:
    """The start of a SHA-256 of the listed files' bytes, in order: an image replaced at the same
    path makes every row run again (its masks, kept, would be another image's)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            digest.update(hashlib.file_digest(file, "sha256").digest())
    return digest.hexdigest()[:16]


class RowEnded(RuntimeError):
    """A row's process that ended without an answer: killed (by the kernel's out-of-memory
    killer, say), or an exit from native code."""

    def __init__(self, exit_code: int | None) -> None:
        how = f"exit code {exit_code}"
        if exit_code is not None and exit_code < 0:
            try:
                how += f": {signal.Signals(-exit_code).name}"
            except ValueError:  # a real-time signal: no name
                how += f": signal {-exit_code}"
            if -exit_code == signal.SIGKILL:
                how += ", which the system also sends where memory runs out"
        super().__init__(f"the row's process ended without an answer ({how})")


def in_fresh_process(function: Callable[..., T], *arguments) -> T:
    """function(*arguments) in a process of its own (spawned: nothing inherited), its result or
    its error; the process is ended if this one stops first (Ctrl-C, SIGTERM), not left to
    finish its row unseen."""
    context = get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=answer_through, args=(sender, os.getpid(), function, *arguments),
                              name="study-row")
    try:
        # Started with Ctrl-C ignored, which it inherits: a Ctrl-C while it imports torch, before
        # answer_through, printed its KeyboardInterrupt traceback. The study's process handles it.
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            process.start()
        finally:
            signal.signal(signal.SIGINT, handler)
        sender.close()
        outcome, value = receiver.recv()
    except EOFError:
        process.join()
        raise RowEnded(process.exitcode) from None
    except BaseException:  # stopped while the row runs
        end_process(process, "stopped")
        raise
    end_process(process, "answered")
    if outcome == "error":
        raise value
    return value


def end_process(process, why: str) -> None:
    """Waits for a row's process to end: by itself once it has answered; a stopped one is sent
    SIGTERM, on which it exits at its next Python step, its clean-up done. One stuck (in a long
    kernel, or a device's teardown) is killed after 60 s."""
    if process.pid is None:  # never started
        return
    if why == "stopped":
        process.terminate()
    process.join(timeout=60)
    if process.is_alive():
        log.warning("the row's process (%s) did not end within 60 s: killed", why)
        process.kill()
        process.join()


def answer_through(connection: Connection, study_pid: int, function: Callable, *arguments) -> None:
    """In the row's process: function's result, or its error (its traceback logged here), sent back.
    Ctrl-C is the study's process's to handle: it ends this one with SIGTERM, which exits
    cleanly (multiprocessing's semaphores released, none reported leaked)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    exit_with_parent(study_pid)
    try:
        connection.send(("ok", function(*arguments)))
    except Exception as error:  # noqa: BLE001 - the study's process raises it
        if not isinstance(error, CheckpointError):  # that one is a message for the user, not a bug
            log.exception("the row failed")
        try:
            pickle.loads(pickle.dumps(error))  # some pickle but cannot be rebuilt (other __init__ arguments)
        except Exception:  # noqa: BLE001 - sent as its name and message instead
            error = RuntimeError(f"{type(error).__name__}: {error}")
        connection.send(("error", error))


def exit_with_parent(parent: int) -> None:
    """Ends this row's process when the study's process (`parent`, its pid as the study gave it)
    is gone (killed with SIGKILL, which leaves it no time to end the row's), instead of finishing
    the row unseen and holding its memory. The pid comes from the study: read here, after the
    seconds of spawning and importing torch, it was already another's where the study was killed
    meanwhile, and the row ran to its end."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def run_row(row: Row, settings: dict, checkpoint: Path, row_dir: Path, label: str) -> dict:
    """Runs one row over every image (in a process of its own) and returns its measurements."""
    set_up_logging()
    device = settings["device"]
    set_up_cpu_process(device, settings["threads"])  # as the server's and the benchmark's: measured as they serve
    config = AMGConfig(**settings["amg"])
    paths = settings["images"]
    with Stopwatch(device) as startup:
        loaded = load_model(checkpoint, settings["model_type"], device)
        generator = build_generator(get_mode(row.mode), loaded, config)  # compiles a fast mode on CUDA
        # Warm-up, untimed: lazy initialisation happens on the first image.
        generator.generate(read_image_file(paths[0]))
    reset_peak_memory(device)

    seconds, points_per_batch = [], []
    partial = row_dir / "rle_masks.partial"
    progress = ProgressLog(label, len(paths))
    waits_before, started = thread_waits(), time.perf_counter()
    with partial.open("w") as out:
        for path in tqdm(paths, desc=label, unit="image", disable=None):  # a progress bar on a terminal only
            data = Path(path).read_bytes()
            with Stopwatch(device) as request:
                image = decode_image(data, FILE_MAX_PIXELS)
                rles = generator.generate(image)
            seconds.append(request.seconds)
            points_per_batch.append(generator.points_per_batch_on(*image.shape[:2]))
            out.write(answer_text(rles) + "\n")
            progress.done(len(seconds))
    waited, wall_seconds = core_wait_seconds_since(waits_before), time.perf_counter() - started
    core_wait = None if waited is None else core_wait_pct(waited, wall_seconds, device)
    if core_wait is not None and core_wait > CORE_WAIT_WARN_PCT:
        log.warning("%s: its threads waited for a core %.0f%% of the time it was measured: other work on the "
                    "cores (its times are not its own; --threads, or run it alone)", label, core_wait)
    partial.replace(row_dir / "rle_masks")
    peak_mib, peak_pct = peak_memory_mib(device)
    return {
        "settings": settings, **latency_summary_ms(seconds), "core_wait_pct": core_wait, "startup_s": startup.seconds,
        "max_memory_mib": peak_mib, "max_memory_pct": peak_pct,
        "points_per_batch": min(points_per_batch),  # the baseline's fewer on large images
        "request_seconds": seconds,  # in the list's order: the figures above can be checked
    }


class ProgressLog:
    """Where no terminal shows tqdm's bar (a run's log sent to a file), a log line at most every
    `every_s` seconds: how many images are done."""

    def __init__(self, label: str, total: int, every_s: float = PROGRESS_EVERY_S) -> None:
        self.label, self.total, self.every_s = label, total, every_s
        self.enabled = not sys.stderr.isatty()
        self.started = self.last = time.monotonic()

    def done(self, images: int) -> None:
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s and images < self.total:
            self.last = now
            log.info("%s: %d of %d images, %.0f s so far", self.label, images, self.total, now - self.started)


def put_back_unfinished(row_dir: Path) -> None:
    """A row whose study was killed while the row ran (SIGKILL, the machine going down) left the
    earlier run's files set aside (measured_row's *.earlier), and maybe its own masks without
    their settings: the earlier row is put back. Where the row had finished (killed as the files
    set aside were deleted), those go."""
    asides = [row_dir / f"{name}.earlier" for name in ("stats.json", "rle_masks")]
    if not any(aside.exists() for aside in asides):
        return
    finished = (row_dir / "stats.json").exists()
    if not finished:
        for name in ("rle_masks", "rle_masks.partial"):
            (row_dir / name).unlink(missing_ok=True)
    for aside in asides:
        if finished:
            aside.unlink(missing_ok=True)
        elif aside.exists():
            aside.replace(aside.with_suffix(""))


def measured_row(row: Row, settings: dict, checkpoint: Path, row_dir: Path, label: str) -> dict:
    """The row's measurements: from an earlier run with the same settings, or run now."""
    stats_path = row_dir / "stats.json"
    put_back_unfinished(row_dir)
    if stats_path.is_file() and (row_dir / "rle_masks").is_file():
        try:
            stats = json.loads(stats_path.read_text())
            done_with = dict(stats["settings"])
        except (ValueError, KeyError, TypeError):
            log.info("%s: %s cannot be read; running again, replacing it", label, stats_path)
        else:
            if done_with == settings:
                log.info("%s: already done with the same settings, skipped", label)
                return stats
            log.info("%s: %s holds a run with other settings (%s); running again, replacing it", label, row_dir,
                     ", ".join(settings_changed(done_with, settings)))
    row_dir.mkdir(parents=True, exist_ok=True)
    # A row is its masks with the settings that made them, never one without the other (which
    # compare_rle_lists.py would take for a row of unknown settings): an earlier run's files are
    # set aside while the row runs, put back if it does not finish (stopped, failed, a damaged
    # checkpoint: its masks are not lost), and deleted once it has.
    masks_path = row_dir / "rle_masks"
    earlier = [(path, path.with_name(path.name + ".earlier")) for path in (stats_path, masks_path) if path.exists()]
    for path, aside in earlier:
        path.replace(aside)
    # A fresh process per row: its peak memory, caches and compiled code are its own.
    log.info("%s: started", label)  # on a terminal, a progress bar too
    started = time.monotonic()
    try:
        stats = in_fresh_process(run_row, row, settings, checkpoint, row_dir, label)
    except BaseException:
        (row_dir / "rle_masks.partial").unlink(missing_ok=True)  # a stopped row's first images: a rerun redoes them
        masks_path.unlink(missing_ok=True)  # written by the row's process, its settings not yet
        for path, aside in earlier:
            aside.replace(path)
        if not any(row_dir.iterdir()):  # failed before writing anything: no empty folder left
            row_dir.rmdir()
        raise
    partial = stats_path.with_suffix(".partial")
    partial.write_text(json.dumps(stats, indent=1))
    partial.replace(stats_path)
    for _, aside in earlier:
        aside.unlink(missing_ok=True)
    log.info("%s: done in %.0f s", label, time.monotonic() - started)
    return stats


def result_line(row: Row, config: AMGConfig, stats: dict, baseline_dir: Path, row_dir: Path) -> dict:
    summary = summarize(compare_results(baseline_dir / "rle_masks", row_dir / "rle_masks"))
    settings = stats["settings"]
    return {
        "mode": row.mode, **{key: summary.as_dict()[key] for key in COMPARISON_COLUMNS},
        **{key: stats[key] for key in ("ms_per_request", "p50", "p90", "p99", "core_wait_pct", "startup_s",
                                        "max_memory_mib", "max_memory_pct")},
        "batch_size": BATCH_SIZE, "points_per_batch": stats["points_per_batch"],
        "points_per_side": config.points_per_side,
        "model_type": settings["model_type"], "device": settings["device"],
        "torch_version": settings["torch_version"],
    }


def write_csv(lines: list[dict], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        for line in lines:
            writer.writerow({k: format_float(v) if isinstance(v, float) or v is None else v
                             for k, v in line.items()})


def plot(lines: list[dict], path: Path) -> None:
    """ms per request against mIoU, one point per row, written as a PNG."""
    result_figure(lines).savefig(path)


def result_figure(lines: list[dict]) -> Figure:
    """ms per request against mIoU, one marked point per row, named in a legend beside the axes
    (rows often land on the same spot: mIoU 1.0 for baseline and ao, labels there would overlap).
    A row whose strict mIoU is empty (every image's mask count differs) is drawn hollow at its
    relaxed mIoU (it was left off the axes)."""
    figure = Figure(figsize=(8, 4.5), dpi=120, layout="constrained")
    axes = figure.subplots()
    for number, line in enumerate(lines):
        label = f"{line['mode']} (bs {line['batch_size']}, ppb {line['points_per_batch']})"
        marker = dict(marker="osD^vP*X"[number % 8], s=40, alpha=0.8)
        if line["miou"] is not None:
            axes.scatter(line["ms_per_request"], line["miou"], label=label, **marker)
        else:  # no image with the baseline's mask count: shown at its relaxed mIoU, hollow
            axes.scatter(line["ms_per_request"], line["relaxed_miou"], label=f"{label}, relaxed mIoU",
                         facecolors="none", edgecolors=f"C{number % 10}", **marker)
    axes.set_xlabel("ms per request (mean)")
    axes.set_ylabel("mIoU against baseline (strict)")
    side = lines[0]["points_per_side"]
    axes.set_title(f"SAM2.1 {lines[0]['model_type']} on {lines[0]['device']}, {lines[0]['images']} images, "
                   f"{side}x{side} grid")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    return figure


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, AMGConfig]]:
    """The options, and the AMG settings they give each mode."""
    parser = ScriptParser(description=__doc__)
    parser.add_argument("image_paths_file", help="a file with one image path per line")
    parser.add_argument("output_folder", help="where each row's masks, result.csv and result.png go")
    add_option(parser, "checkpoint_dir", default="~/checkpoints/sam2",
               help="folder with sam2.1_hiera_<size>.pt (downloaded there if missing)")
    add_option(parser, "model_type", default="large", choices=MODEL_TYPE_CHOICES, help="model size")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=sorted(MODES),
                        help="the rows to run (baseline always runs: the others are compared with it)")
    add_amg_options(parser)
    add_device_option(parser)
    add_threads_option(parser)
    args = parser.parse_args(argv)
    check_threads(parser, args.threads)
    try:
        require_checkpoint_pair(args.checkpoint_dir, args.model_type)  # an empty folder's name, here
    except ValueError as error:
        parser.error(f"--checkpoint-dir: {error}")
    args.output_folder = require_output_folder(parser, args.output_folder, "output_folder")  # ~ expanded
    return args, {name: amg_config(parser, args, mode) for name, mode in MODES.items()}


def existing_image_paths(path: str) -> list[str]:
    try:
        return checked_image_paths(path)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error_text(error)}")


def main(argv: list[str] | None = None) -> None:
    set_up_logging()
    take_over_stops()  # SIGTERM a stop, as Ctrl-C: its row's process ended too
    try:
        run_study(argv)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the statuses of the other scripts (run_script)
        print(f"stopped ({stopped_by(stop)}); the same command again resumes it (the rows done are kept)",
              file=sys.stderr)
        end_as_stopped(stopped_by(stop))
    except OSError as error:  # the output's files: a folder where result.csv goes, a disk full
        sys.exit(f"error: {error_text(error)}")


def run_study(argv: list[str] | None) -> None:
    args, configs = parse_args(argv)
    left_out = baseline_leaves_out(configs["baseline"])
    if left_out:  # every row would be compared with masks made without it
        sys.exit(f"error: the baseline, which every row is compared with, would not apply --min-mask-region-area: "
                 f"{left_out}")
    image_paths = existing_image_paths(args.image_paths_file)
    try:
        checkpoint = ensure_checkpoint(args.checkpoint_dir, args.model_type)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    output = args.output_folder
    checkpoint_file, code, images = checkpoint_identity(checkpoint), code_identity(), images_identity(image_paths)
    rows = [row for row in STUDY_ROWS if row.mode == "baseline" or row.mode in args.modes]
    baseline_dir = output / row_name(rows[0], configs[rows[0].mode])
    made_output = not output.exists()
    threads = args.threads if torch.device(args.device).type == "cpu" else None  # a GPU row's would change nothing

    lines = []
    for index, row in enumerate(rows):
        config_for_row = configs[row.mode]
        name = row_name(row, config_for_row)
        settings = {
            "row": asdict(row), "checkpoint": checkpoint_file, "model_type": args.model_type,
            "device": args.device, "threads": threads, "amg": asdict(config_for_row),
            "images": [str(Path(p).resolve()) for p in image_paths], "image_contents": images,
            "torch_version": torch.__version__, "code": code,
        }
        try:
            stats = measured_row(row, settings, checkpoint, output / name, f"row {index + 1}/{len(rows)} {name}")
        except CheckpointError as error:  # a file that is not a checkpoint of that size
            sys.exit(f"error: {error}")
        except RowEnded as error:  # its log, above, says how far it came
            sys.exit(f"error: {name}: {error}; the rows done are kept")
        finally:  # the output folder this run made, if the first row failed before writing in it
            if made_output and output.is_dir() and not any(output.iterdir()):
                output.rmdir()
        try:
            lines.append(result_line(row, config_for_row, stats, baseline_dir, output / name))
        except ValueError as error:  # masks that do not pair with the baseline's (a row's files edited)
            sys.exit(f"error: {name} cannot be compared with the baseline: {error}")
        if row.mode == "baseline" and lines[0]["masks_per_image"] == 0:
            log.warning("the baseline found no mask on any image: every mIoU will be 1.0 and say nothing of "
                        "accuracy (random weights, or thresholds no mask passes)")
        write_csv(lines, output / "result.csv")  # after each row: never a table of another run's rows
        plot(lines, output / "result.png")

    print((output / "result.csv").read_text(), end="")
    log.info("wrote %s and %s", output / "result.csv", output / "result.png")


if __name__ == "__main__":
    main()
