"""Every mode side by side on the same images and weights, in one process, and a table.

    python -m tools.benchmark ~/checkpoints/sam2 large --images photos/*.jpg
    python -m tools.benchmark ~/checkpoints/random tiny --generated 2 --modes baseline ao fast_furious

Modes take turns image by image (baseline, ao, fast, ... on image 1, then on image 2, ...), so a
machine that slows down or speeds up during the run weighs on every mode alike. The fast modes
compile (or load their export) and run once on a blank image before the clock starts; every row
also runs the first image once, untimed (CUDA's lazy set-up, a CPU's first allocations; on a CPU
on one batch of points). A row that fails there is left out of the tables with a note and the
others are measured (a fast mode is first tried again in torch.compile's default mode). On a CPU
the process is set up as the server sets itself up (sam2serve/cpu.py: freed memory reused,
denormals flushed), for every row. Each image is timed from its RGB array to the RLE masks.
Peak memory is, on CUDA, the most allocated during a mode's requests; on a CPU, the most memory
malloc has handed out above its level when the request started, sampled every 5 ms
(sam2serve/timing.py). Every mode is compared with the baseline on the same image (masks matched
one to one, see compare_rle_lists.py), or with ao (--reference ao).
Wall-clock figures belong here, never in tests.
"""

import argparse
import gc
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

if not __package__:  # run by its path (python tools/benchmark.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import numpy as np
import torch
from sam2.utils.amg import build_point_grid
from torch.profiler import ProfilerActivity, profile
from tqdm import tqdm

from sam2serve.amg import AMGConfig, baseline_leaves_out
from sam2serve.checkpoints import CheckpointError, model_size, resolve_checkpoint
from sam2serve.cli import (
    ScriptParser, add_amg_options, add_checkpoint_arguments, add_cpu_target_option, add_device_option, add_option,
    add_threads_option, amg_config, check_checkpoint_arguments, check_threads, checkpoint_from_arguments,
    compile_modes, number_type, positive_int, read_images, require_cpu_target, require_device,
    require_one_fast_folder, require_output_folder, run_script, set_up_logging,
)
from sam2serve.compare import compare_image, summarize
from sam2serve.cpu import for_cpu_target, on_cpu, set_up_cpu_process
from sam2serve.fast import PackageMismatch, default_compile_mode
from sam2serve.model import FactoredPointDecoder, ImageEncoder, PointDecoder, default_prompts_per_step
from sam2serve.modes import MODES, get_mode, load_pipeline
from sam2serve.preprocess import MAX_SIDE, image_to_input
from sam2serve.rle import RLE, answer_text
from sam2serve.study import STUDY_ROW, StudyMaskGenerator, build_study_model, study_unavailable
from sam2serve.timing import (
    CORE_WAIT_WARN_PCT, PeakMemory, Stopwatch, allocated_mib, core_wait_pct, core_wait_seconds_since,
    device_description, latency_summary_ms, thread_waits,
)
from training.scenes import make_scene

log = logging.getLogger("benchmark")
ROWS = list(MODES) + [STUDY_ROW]
# A generated scene's side: at most the server's (a side of 100000 asked numpy for 149 GiB).
image_side = number_type(int, "a whole number", lambda value: 1 <= value <= MAX_SIDE, f"1 to {MAX_SIDE}")
# --filters: the predicted-IoU and stability thresholds of each table ("off": every candidate
# is computed and checked, so that no row skips work that a trained model would do).
DEFAULTS = AMGConfig()
FILTERS = {
    "off": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
    "sam2": dict(pred_iou_thresh=DEFAULTS.pred_iou_thresh, stability_score_thresh=DEFAULTS.stability_score_thresh),
}


@dataclass
class ModeRun:
    """One row's measurements over the run: a mode, or the study's pipeline."""

    mode: str
    ready_seconds: float = 0.0  # loading, compiling or exporting, warming up
    held_mib: float = 0.0  # memory kept once ready: weights, compiled kernels' memory pools, caches
    seconds: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    masks: dict[int, list[RLE]] = field(default_factory=dict)  # image index -> masks
    repeats: dict[int, list[float]] = field(default_factory=dict)  # image index -> seconds of each request
    core_wait_seconds: float | None = 0.0  # its threads' wait for a core during its requests (None: not known)


def load_images(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    """(name, RGB array) of each image; files are named by their file name where no two share one
    (the tables' rows stay narrow), else by their path as given."""
    if args.images:
        images = read_images(parser, args.images)
        names = [Path(path).name for path, _ in images]
        return [(name, image) for name, (_, image) in zip(names, images)] if len(set(names)) == len(names) else images
    height, width = args.size
    return [
        (f"generated-{seed}", make_scene(np.random.default_rng(seed), height, width).image)
        for seed in range(1000, 1000 + args.generated)
    ]


def reference_of(runs: list[ModeRun], reference: str) -> ModeRun | None:
    """The row the others are compared with (the baseline, or ao), first, unless it was left out."""
    return runs[0] if runs and runs[0].mode == reference else None


def table(runs: list[ModeRun], n_images: int, reference: str = "baseline") -> str:
    """The results, the reference row (the baseline, or ao) first, as a Markdown table (what its
    timing and memory columns mean: table_legend); "x study", the ratio of throughputs to the study's pipeline, only
    where that ran. Without the reference its columns read n/a."""
    reference_run = reference_of(runs, reference)
    rates = {run.mode: len(run.seconds) / sum(run.seconds) for run in runs}
    study_rate = rates.get(STUDY_ROW)
    study_column = "" if study_rate is None else " x study |"
    header = (f"| mode | ready s | ms per image (median) | p90 | images/s | x {reference} |{study_column} peak MiB "
              f"| held MiB | masks per image | mIoU vs {reference} | relaxed mIoU | mask count mismatch |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for run in runs:
        latency = latency_summary_ms(run.seconds)
        rate = rates[run.mode]
        versus_reference, miou, relaxed, mismatch = "n/a", "n/a", "n/a", "n/a"
        if reference_run is not None:
            summary = summarize([compare_image(str(i), reference_run.masks[i], run.masks[i]) for i in range(n_images)])
            versus_reference = f"{rate / rates[reference]:.2f}"
            miou = "n/a" if summary.miou is None else f"{summary.miou:.6f}"  # n/a: every image a mismatch
            relaxed = f"{summary.relaxed_miou:.6f}"
            mismatch = f"{summary.mask_count_mismatch}/{summary.images}"
        masks = np.mean([len(m) for m in run.masks.values()])
        versus_study = "" if study_rate is None else f" {rate / study_rate:.2f} |"
        lines.append(
            f"| {run.mode} | {run.ready_seconds:.1f} | {latency['p50']:.0f} | {latency['p90']:.0f} | {rate:.3f} "
            f"| {versus_reference} |{versus_study} {run.peak_mib:.0f} | {run.held_mib:.0f} "
            f"| {masks:.1f} | {miou} | {relaxed} | {mismatch} |"
        )
    return "\n".join(lines)


def table_legend(reference: str, with_study: bool = False) -> str:
    """What the table's columns mean, under it: the ratios are of totals, not of the medians
    beside them, and a request's peak memory is counted above what the process held already."""
    study = "; x study: the same over the study's pipeline" if with_study else ""
    return (f"ready s: loading, compiling and warming up; ms per image: the median request, p90 its 90th "
            f"percentile; images/s: requests answered per second of the time they all took, and x {reference}: "
            f"that over {reference}'s (a ratio of totals, not of the medians){study}. peak MiB: the most memory a request "
            f"took above what was in use when it started (CUDA: allocated; CPU: handed out by malloc, sampled "
            f"every 5 ms); held MiB: what the loaded mode holds (weights, caches, kernels), not counted in peak.")


def compiled_row(row: str) -> bool:
    """Whether a row is a fast mode (the study's row is no mode of this project)."""
    return row in MODES and MODES[row].compiled


def fast_kernels_description(args: argparse.Namespace) -> str:
    if args.load_fast:
        return f"kernels loaded from {args.load_fast}/<mode>"
    if args.save_fast:
        return (f"kernels exported{for_cpu_target(args.cpu_target)} to {args.save_fast}/<mode> "
                "(torch.export + AOTInductor), then loaded")
    if on_cpu(args.device) and not args.compile_mode:
        return "ao's eager kernels in their precision (on a CPU; --compile-mode compiles them)"
    return f"torch.compile mode {args.compile_mode or default_compile_mode(args.device)}"


def save_masks(directory: Path, filters: str | None, runs: dict[str, ModeRun], n_images: int) -> None:
    """Each row's masks as one /upload_rle answer per image and line (compare_rle_lists.py reads them)."""
    directory.mkdir(parents=True, exist_ok=True)
    for row, run in runs.items():
        name = row if filters is None else f"{filters}_{row}"
        lines = [answer_text(run.masks[index]) + "\n" for index in range(n_images)]
        (directory / f"{name}.jsonl").write_text("".join(lines))


def decoder_ablation(model, image: np.ndarray, n_points: int, iou_thresh: float, device: str) -> str:
    """What each change to the mask decoder buys: ms per point prompt of sam2's decoder and of
    ao's decoder with one change added at a time, on one image's features and 64 points spread
    over its grid (sam2's decoder is slow on a CPU)."""
    with torch.inference_mode():
        features = ImageEncoder(model)(image_to_input(image, model.image_size).to(model.device))
    grid = build_point_grid(int(np.sqrt(n_points))) * model.image_size
    spread = np.linspace(0, len(grid) - 1, min(64, len(grid))).round().astype(int)
    coords = torch.as_tensor(grid[spread], dtype=torch.float32, device=model.device)
    step = default_prompts_per_step(model)
    n = len(coords)
    variants = [
        (f"sam2's decoder (PointDecoder), {n} prompts per call", PointDecoder(model, True)),
        (f"image side once per call, all {n} prompts in one step", FactoredPointDecoder(model, True)),
        (f"... in steps of {step} prompts", FactoredPointDecoder(model, True, step)),
        (f"... no masks for prompts failing the IoU filter ({iou_thresh})",
         FactoredPointDecoder(model, True, step, iou_gate=iou_thresh)),
    ]
    lines = ["| mask decoder | ms per prompt | x sam2's |", "|---|---|---|"]
    reference_ms = None
    for name, decoder in variants:
        with torch.inference_mode(), Stopwatch(device) as watch:
            decoder(*features, coords)  # (at most 64 prompts: one call)
        ms = watch.seconds * 1000 / len(coords)
        reference_ms = reference_ms or ms
        lines.append(f"| {name} | {ms:.1f} | {reference_ms / ms:.1f} |")
    return "\n".join(lines)


def load_row(row: str, parser: argparse.ArgumentParser, args: argparse.Namespace, thresholds: dict,
             compile_mode: str | None = None):
    """The generator of one row (a mode, or the study's pipeline), compiled or loaded, warmed up;
    compile_mode: instead of --compile-mode."""
    mode = get_mode("ao" if row == STUDY_ROW else row)
    config = replace(amg_config(parser, args, mode), **thresholds)
    if row == STUDY_ROW:
        path, model_type = resolve_checkpoint(args.checkpoint_dir, args.model_type)
        return StudyMaskGenerator(build_study_model(model_size(model_type), path, args.device), config)
    export = {"save_fast": args.save_fast, "load_fast": args.load_fast} if mode.compiled else {}
    export = {key: Path(value) / row for key, value in export.items() if value}
    if "save_fast" in export:
        export["cpu_target"] = args.cpu_target
    return load_pipeline(args.checkpoint_dir, args.model_type, row, args.device, config=config,
                         compile_mode=compile_mode or args.compile_mode, **export).generator


def settle_process(parser: argparse.ArgumentParser, args: argparse.Namespace, thresholds: dict,
                   first_image: np.ndarray) -> None:
    """Loads ao's eager pipeline, runs one batch of points and drops it, before any row: the
    process's one-off set-up (CUDA's context and cuBLAS workspace, a CPU's library caches and
    pools: about 24 MiB) counted in the first row's seconds until ready and memory held."""
    try:
        generator = load_row("ao", parser, args, thresholds)
        with torch.inference_mode():
            generator.with_config(warm_up_grid(generator.config)).generate(first_image)
    except CheckpointError:  # every row's
        raise
    except Exception as error:  # noqa: BLE001 (ao's failure is its row's to tell, not the run's end)
        log.warning("ao's throwaway run failed (%s: %s): the first row's seconds and memory include the process's "
                    "set-up", type(error).__name__, failure_reason(error))
        return
    del generator
    gc.collect()


def ready_rows(rows: list[str], parser: argparse.ArgumentParser, args: argparse.Namespace, thresholds: dict,
               first_image: np.ndarray) -> tuple[dict, dict[str, ModeRun], dict[str, str]]:
    """Every row loaded (load_row) and run once on the first image untimed, so that one-off costs
    (CUDA's lazy set-up, a CPU's first allocations and kernel choices, a compilation) land in
    none of its timed requests; on a CPU on one batch of points only (warm_up_grid), since sam2's
    decoder there takes about 0.2 s per point prompt at 1024 pixels: (generators, each row's
    seconds until ready and memory held then, notes). A row that fails there is left out with a
    note instead of ending the run; a compiled row that fails in a chosen compile mode (CUDA
    graphs, GEMM search) is tried once more in torch.compile's default mode, but not one exported
    or loaded (--save-fast, --load-fast: AOTInductor makes its kernels in any compile mode, and it
    would export for minutes again, or crash in the same loader). The reference row's failure ends
    it: every row is compared with it."""
    generators, ready, notes = {}, {}, {}
    cuda = torch.device(args.device).type == "cuda"
    # The mode a compiled row compiles in: the one given, else max-autotune on CUDA; on a CPU
    # none is (its fast rows run eager kernels unless --compile-mode is given).
    chosen = args.compile_mode or (default_compile_mode(args.device) if cuda else None)
    try_again = chosen not in (None, "default") and not (args.save_fast or args.load_fast)
    for row in rows:
        compile_modes = [None]
        if compiled_row(row) and try_again:
            compile_modes.append("default")
        for compile_mode in compile_modes:
            started, memory_before = time.perf_counter(), allocated_mib(args.device)
            try:
                generator = load_row(row, parser, args, thresholds, compile_mode)
                warm_up = generator if cuda else generator.with_config(warm_up_grid(generator.config))
                with torch.inference_mode():
                    warm_up.generate(first_image)
            except Exception as error:  # noqa: BLE001 (one row's failure must not lose the others')
                if row == args.reference or isinstance(error, CheckpointError):  # the checkpoint is every row's
                    raise
                how = f" in compile mode {compile_mode or chosen}" if len(compile_modes) > 1 else ""
                log.exception("%s failed%s", row, how)
                failure = f"failed{how}: {type(error).__name__}: {failure_reason(error)}"
                notes[row] = f"{notes[row]}; {failure}" if row in notes else failure
                continue
            generators[row] = generator
            ready[row] = ModeRun(row, ready_seconds=time.perf_counter() - started,
                                 held_mib=allocated_mib(args.device) - memory_before)
            if compile_mode:
                notes[row] += "; its row is compiled in the default mode"
            log.info("%s ready in %.1f s, holding %.0f MiB (points per batch %d)", row, ready[row].ready_seconds,
                     ready[row].held_mib, generator.config.points_per_batch)
            break
    return generators, ready, notes


def warm_up_grid(config: AMGConfig) -> AMGConfig:
    """The settings with a grid of one full batch of points (at most the run's own grid): every
    kernel and shape of a request's batches, at a fraction of its cost."""
    side = min(math.isqrt(config.points_per_batch - 1) + 1, config.points_per_side)
    return replace(config, points_per_side=side)


def failure_reason(error: Exception) -> str:
    """A row's failure in one line: the first of the error (the rest of a CUDA error is its
    traceback), or all of a refused package's (the lines that follow say what differs)."""
    if isinstance(error, PackageMismatch):
        return error.one_line()[:400]
    return ([line.strip() for line in str(error).splitlines()] or [""])[0][:200]


def measure(generators: dict, images: list[tuple[str, np.ndarray]], rounds: int, device: str,
            repeat: int = 1) -> dict[str, ModeRun]:
    """Every row on every image, taking turns image by image (each request `repeat` times in a
    row): time, peak memory, masks."""
    runs = {row: ModeRun(row) for row in generators}
    with tqdm(total=rounds * len(images) * len(runs) * repeat, unit="request", file=sys.stderr,
              disable=None) as progress:  # on a terminal only: a log file gets no carriage-return lines
        for _ in range(rounds):
            for index, (image_name, image) in enumerate(images):
                for row, generator in generators.items():
                    progress.set_description(f"{row} on {image_name}")
                    for _ in range(repeat):
                        waits = thread_waits()
                        with PeakMemory(device) as memory, Stopwatch(device) as watch:
                            runs[row].masks[index] = generator.generate(image)
                        runs[row].seconds.append(watch.seconds)
                        waited = core_wait_seconds_since(waits)
                        if waited is None or runs[row].core_wait_seconds is None:
                            runs[row].core_wait_seconds = None
                        else:
                            runs[row].core_wait_seconds += waited
                        runs[row].repeats.setdefault(index, []).append(watch.seconds)
                        runs[row].peak_mib = max(runs[row].peak_mib, memory.mib)
                        progress.update()
    return runs


def core_wait_line(runs: list[ModeRun], device: str = "cpu") -> str | None:
    """How long each row's threads waited for a core during its requests: over CORE_WAIT_WARN_PCT,
    other work was on the cores and the table's times are not the rows' own. None where the
    kernel does not say."""
    shares = {run.mode: core_wait_pct(run.core_wait_seconds, sum(run.seconds), device)
              for run in runs if run.core_wait_seconds is not None}
    if not shares:
        return None
    line = ("Waited for a core, share of each row's timed requests (its model's threads): "
            + ", ".join(f"{mode} {share:.1f}%" for mode, share in shares.items()))
    if max(shares.values()) > CORE_WAIT_WARN_PCT:
        line += f"; over {CORE_WAIT_WARN_PCT:.0f}%: other work was on the cores, these times are not the rows' own"
    return line


def spread_table(runs: list[ModeRun], images: list[tuple[str, np.ndarray]]) -> str:
    """The same request repeated: min, median and max ms per row and image, and max over min."""
    lines = ["| mode | image | requests | min ms | median ms | max ms | max / min |", "|---|---|---|---|---|---|---|"]
    for run in runs:
        for index, seconds in sorted(run.repeats.items()):
            ms = sorted(1000 * s for s in seconds)
            lines.append(f"| {run.mode} | {images[index][0]} | {len(ms)} | {ms[0]:.0f} | {np.median(ms):.0f} "
                         f"| {ms[-1]:.0f} | {ms[-1] / ms[0]:.2f} |")
    return "\n".join(lines)


def per_image_table(runs: list[ModeRun], images: list[tuple[str, np.ndarray]], reference: str = "baseline") -> str:
    """Each image's median ms per row (the reference first) and its ratio to the reference on
    that image: a speed-up that holds on one kind of image and not on another shows here, not in
    the medians above. Without the reference, ms only."""
    compared = reference_of(runs, reference) is not None
    unit = f"ms (x {reference})" if compared else "ms"
    lines = ["| image | " + " | ".join(f"{run.mode} {unit}" for run in runs) + " |",
             "|---" * (len(runs) + 1) + "|"]
    for index, (name, _) in enumerate(images):
        seconds = [np.median(run.repeats[index]) for run in runs]
        cells = [f"{1000 * s:.0f}" + (f" ({seconds[0] / s:.2f})" if compared else "") for s in seconds]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


STAGES = ("amg.encode", "amg.decode", "amg.scores", "amg.nms", "amg.masks")  # MaskGenerator's labels


def markdown_cell(text: str, width: int = 160) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= width else text[: width - 3] + "..."


def profile_table(generator, image: np.ndarray, device: str, top: int = 25) -> str:
    """One request under torch.profiler: the recipe's stages (MaskGenerator labels them; sam2's
    generator has none), then the operations with the most time of their own: on CUDA device time
    (kernels), on a CPU CPU time. The profiler slows a request down: read the shares, and the
    tables above for the time. Names are kept long enough to tell Inductor's fused kernels apart
    (their names list the operations fused)."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if not cuda:  # else the profiler's library logs a failed GPU query, and its stages, to stderr
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=activities) as profiler, Stopwatch(device) as watch:
        generator.generate(image)
    events = profiler.key_averages()
    by_name = {event.key: event for event in events}
    lines = [f"{watch.seconds * 1000:.0f} ms under the profiler.", ""]
    stages = [by_name[name] for name in STAGES if name in by_name]
    if stages:
        device_column = (" device ms (kernels launched in it) |", "---|") if cuda else ("", "")
        lines += ["| stage | calls | CPU ms |" + device_column[0], "|---|---|---|" + device_column[1]]
        for event in stages:
            device_ms = f" {event.device_time_total / 1000:.1f} |" if cuda else ""
            lines.append(f"| {event.key} | {event.count} | {event.cpu_time_total / 1000:.1f} |{device_ms}")
        lines.append("")

    def own(event) -> float:
        return event.self_device_time_total if cuda else event.self_cpu_time_total

    total = sum(own(event) for event in events) or 1.0
    clock = "device" if cuda else "CPU"
    lines += [f"| operation | calls | own {clock} ms | share |", "|---|---|---|---|"]
    for event in sorted(events, key=own, reverse=True)[:top]:
        lines.append(f"| {markdown_cell(event.key)} | {event.count} | {own(event) / 1000:.1f} "
                     f"| {100 * own(event) / total:.1f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = ScriptParser(description=__doc__)
    add_checkpoint_arguments(parser)
    parser.add_argument("--modes", nargs="+", default=ROWS, choices=ROWS,
                        help=f"rows: modes, and {STUDY_ROW} (the study's own pipeline, CUDA only); "
                        "the reference row runs first unless --without-reference")
    parser.add_argument("--reference", default="baseline", choices=("baseline", "ao"),
                        help="the row every row is compared with: the baseline (sam2's own generator), or ao, "
                        "which gives the baseline's masks (the tests check it) in a fraction of its time when "
                        "every candidate is kept (--filters off)")
    parser.add_argument("--without-reference", "--without-baseline", dest="without_reference", action="store_true",
                        help="leave the reference row out (its columns read n/a): for runs that compare a mode's "
                        "masks with its own elsewhere, as an export with its load (--save-masks)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", help="image files")
    source.add_argument("--generated", type=positive_int, default=2, help="generated scenes instead of files")
    parser.add_argument("--size", type=image_side, nargs=2, default=[768, 1024], metavar=("H", "W"),
                        help="size of generated scenes")
    parser.add_argument("--rounds", type=positive_int, default=1, help="times every image goes through every mode")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="times each request runs in a row (with 2 or more, a table of the spread: min, "
                        "median and max of the same request)")
    parser.add_argument("--filters", nargs="+", choices=sorted(FILTERS),
                        help="one table per setting of the IoU and stability thresholds, from the same loaded "
                        "models: 'off' (0 and 0), 'sam2' (sam2's defaults); default: one table with the "
                        "thresholds given")
    add_option(parser, "compile_mode", choices=compile_modes(), help="torch.compile mode of the fast modes (default: max-autotune on "
               "CUDA; on a CPU they run ao's eager kernels unless this is given)")
    add_option(parser, "save_fast", metavar="DIR", help="fast modes: export their kernels to DIR/<mode>, then use them")
    add_cpu_target_option(parser, "with --save-fast: the CPU the kernels' C++ is compiled for (server.py's option)")
    add_option(parser, "load_fast", metavar="DIR", help="fast modes: load kernels exported to DIR/<mode>")
    add_option(parser, "save_masks", metavar="DIR",
               help="write each row's masks to DIR/<row>.jsonl (<filters>_<row>.jsonl with --filters), one "
               "/upload_rle answer per line, for compare_rle_lists.py")
    parser.add_argument("--profile", action="store_true",
                        help="after the tables, one more request per row on the first image (the first "
                        "table's thresholds) under torch.profiler: time by stage and the operations that take "
                        "the most")
    parser.add_argument("--ablation", action="store_true",
                        help="also time the mask decoder's variants on the first image (a second table)")
    add_amg_options(parser)
    add_device_option(parser)
    add_threads_option(parser)
    args = parser.parse_args()
    require_device(parser, args.device)
    check_threads(parser, args.threads)
    for option, given in (("--modes", args.modes), ("--filters", args.filters or [])):
        if twice := sorted({name for name in given if given.count(name) > 1}):  # the same table or row again
            parser.error(f"{option}: {', '.join(twice)} given more than once")
    require_one_fast_folder(parser, args.save_fast, args.load_fast, args.compile_mode)
    require_cpu_target(parser, args.cpu_target, args.save_fast)
    if args.save_masks is not None:
        args.save_masks = require_output_folder(parser, args.save_masks, "--save-masks")  # ~ expanded
    # Every usage error before the scenes are drawn and the checkpoint is downloaded.
    check_checkpoint_arguments(parser, args)
    filters = args.filters or [None]
    thresholds = [{} if name is None else FILTERS[name] for name in filters]
    rows = ([] if args.without_reference else [args.reference]) + [row for row in args.modes if row != args.reference]
    left_out = baseline_leaves_out(amg_config(parser, args, get_mode("baseline")))
    if left_out and rows[:1] == ["baseline"]:
        parser.error(f"the baseline, which every row is compared with, would not apply --min-mask-region-area: "
                     f"{left_out}; compare with ao (--reference ao), which applies it")
    if args.ablation and "baseline" not in rows:
        parser.error("--ablation times sam2's decoder from the baseline's model: it needs the baseline")
    study_absent = study_unavailable(args.device) if STUDY_ROW in rows else None
    if study_absent:
        rows.remove(STUDY_ROW)
    if not rows:
        parser.error(f"no row to run: {study_absent or 'every mode given was left out'}")
    if (args.save_fast is not None or args.load_fast is not None) and not any(map(compiled_row, rows)):
        parser.error("--save-fast and --load-fast go with a fast mode: --modes fast or fast_furious")
    images = load_images(parser, args)
    set_up_logging("%(asctime)s %(name)s: %(message)s")
    path, model_type = checkpoint_from_arguments(parser, args)
    set_up_cpu_process(args.device, args.threads)  # as the server, before any thread starts: every row alike

    if args.profile and torch.device(args.device).type == "cuda":
        # Start the profiler once before any CUDA graph is captured: profiling a graph captured
        # before the profiler's first use is known to fail (PyTorch's own workaround).
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            pass
    settle_process(parser, args, thresholds[0], images[0][1])
    generators, ready, notes = ready_rows(rows, parser, args, thresholds[0], images[0][1])
    if not generators:
        sys.exit("no row could be made ready: " + "; ".join(f"{row}: {note}" for row, note in notes.items()))

    print(f"SAM2.1 {model_size(model_type).name} from {path}; device {device_description(args.device)}; "
          f"torch {torch.__version__}; {len(images)} images ({', '.join(name for name, _ in images)}), "
          f"{args.points_per_side}x{args.points_per_side} grid, {args.rounds} round(s)"
          + (f"; fast modes: {fast_kernels_description(args)}"
             if any(map(compiled_row, generators)) else ""), flush=True)
    for name, overrides in zip(filters, thresholds):
        for row, generator in generators.items():
            generators[row] = generator.with_config(replace(generator.config, **overrides))
        runs = measure(generators, images, args.rounds, args.device, args.repeat)
        for row, run in runs.items():
            run.ready_seconds, run.held_mib = ready[row].ready_seconds, ready[row].held_mib
        config = next(iter(generators.values())).config
        print(f"\nIoU filter {config.pred_iou_thresh}, stability filter {config.stability_score_thresh}, "
              f"box NMS {config.box_nms_thresh}:")
        print(table(list(runs.values()), len(images), args.reference))
        if waited := core_wait_line(list(runs.values()), args.device):
            print(waited)
        if name == filters[0]:  # under the first table
            print("\n" + table_legend(args.reference, with_study=STUDY_ROW in runs))
        if len(images) > 1:
            print("\nPer image (median of its requests):")
            print(per_image_table(list(runs.values()), images, args.reference))
        if args.repeat > 1:
            print(f"\nThe same request {args.repeat} times in a row ({args.rounds} round(s)):")
            print(spread_table(list(runs.values()), images))
        if study_absent:
            print(f"{STUDY_ROW}: not run: {study_absent}")
        for row, note in notes.items():
            print(f"{row}: {note}")
        sys.stdout.flush()
        if args.save_masks:
            save_masks(Path(args.save_masks), name, runs, len(images))
    failed = [row for row in rows if row not in generators]
    if args.profile:  # last: the tables above are measured without the profiler, whatever it does
        for row, generator in generators.items():
            generator = generator.with_config(replace(generator.config, **thresholds[0]))
            print(f"\nProfile of {row} on {images[0][0]}, the first table's thresholds: ", end="")
            try:
                print(profile_table(generator, images[0][1], args.device), flush=True)
            except RuntimeError as error:
                print(f"failed: {error}", flush=True)
    if args.ablation and "baseline" in failed:
        print("\nMask decoder alone: not timed: the baseline's row, whose model it times, failed")
    elif args.ablation:
        grid_points = args.points_per_side**2
        print(f"\nMask decoder alone, {min(64, grid_points)} of the {grid_points} grid points on {images[0][0]}, "
              "multimask output:")
        print(decoder_ablation(generators["baseline"].generator.predictor.model, images[0][1], grid_points,
                               args.pred_iou_thresh, args.device))
    if failed:  # after every table: a run that lost a row still says what it measured
        sys.exit(f"error: rows that failed and are missing from the tables: {', '.join(failed)} (see above)")


if __name__ == "__main__":
    run_script(main)
