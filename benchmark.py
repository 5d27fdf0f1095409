"""Every mode side by side on the same images and weights, in one process, and a table.

    python benchmark.py ~/checkpoints/sam2 large --images photos/*.jpg
    python benchmark.py /tmp/ck tiny --generated 2 --modes baseline ao fast_furious

Modes take turns image by image (baseline, ao, fast, ... on image 1, then on image 2, ...), so a
machine that slows down or speeds up during the run weighs on every mode alike. The fast modes
compile (or load their export) and run once on a blank image before the clock starts; the eager
modes have nothing to warm up. Each image is timed from its RGB array to the RLE masks. Peak
memory is, on CUDA, the most allocated during a mode's requests; on a CPU, the most resident
memory above what the process held when the request started, sampled every 5 ms. Every mode is
compared with the baseline on the same image (masks matched one to one, see compare_rle_lists.py).
Wall-clock figures belong here, never in tests.
"""

import argparse
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sam2.utils.amg import build_point_grid
from tqdm import tqdm

from sam2serve.amg import ImageEncoder
from sam2serve.checkpoints import MODEL_TYPE_CHOICES
from sam2serve.cli import add_amg_options, add_device_option, amg_config
from sam2serve.compare import compare_image, summarize
from sam2serve.decoder import FactoredPointDecoder, PointDecoder, default_prompts_per_step
from sam2serve.modes import MODES, get_mode, load_pipeline
from sam2serve.preprocess import decode_image, image_to_input
from sam2serve.rle import RLE
from sam2serve.scenes import make_scene
from sam2serve.timing import PeakMemory, Stopwatch, latency_summary_ms

log = logging.getLogger("benchmark")
MAX_PIXELS = 100_000_000


@dataclass
class ModeRun:
    """One mode's measurements over the run."""

    mode: str
    seconds: list[float] = field(default_factory=list)
    peak_mib: float = 0.0
    masks: dict[int, list[RLE]] = field(default_factory=dict)  # image index -> masks


def load_images(args: argparse.Namespace) -> list[tuple[str, np.ndarray]]:
    if args.images:
        return [(path, decode_image(Path(path).read_bytes(), MAX_PIXELS)) for path in args.images]
    height, width = args.size
    return [
        (f"generated-{seed}", make_scene(np.random.default_rng(seed), height, width).image)
        for seed in range(1000, 1000 + args.generated)
    ]


def table(runs: list[ModeRun], n_images: int) -> str:
    """The results, baseline first, as a Markdown table."""
    baseline = runs[0]
    baseline_rate = len(baseline.seconds) / sum(baseline.seconds)
    header = ("| mode | ms per image (median) | p90 | images/s | x baseline | peak MiB | masks per image "
              "| mIoU vs baseline | mask count mismatch |")
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    for run in runs:
        latency = latency_summary_ms(run.seconds)
        rate = len(run.seconds) / sum(run.seconds)
        summary = summarize([compare_image(str(i), baseline.masks[i], run.masks[i]) for i in range(n_images)])
        miou = "n/a" if summary.miou is None else f"{summary.miou:.6f}"
        masks = np.mean([len(m) for m in run.masks.values()])
        lines.append(
            f"| {run.mode} | {latency['p50']:.0f} | {latency['p90']:.0f} | {rate:.3f} "
            f"| {rate / baseline_rate:.2f} | {run.peak_mib:.0f} | {masks:.1f} | {miou} "
            f"| {summary.mask_count_mismatch}/{summary.images} |"
        )
    return "\n".join(lines)


def decoder_ablation(pipeline, image: np.ndarray, n_points: int, iou_thresh: float, device: str) -> str:
    """What each change to the mask decoder buys: ms per point prompt of sam2's decoder and of
    ao's decoder with one change added at a time, on one image's features and 64 points spread
    over its grid (sam2's decoder is slow on a CPU)."""
    model = pipeline.loaded.model
    with torch.inference_mode():
        features = ImageEncoder(model)(image_to_input(image, model.image_size).to(model.device))
    grid = build_point_grid(int(np.sqrt(n_points))) * model.image_size
    spread = np.linspace(0, len(grid) - 1, min(64, len(grid))).round().astype(int)
    coords = torch.as_tensor(grid[spread], dtype=torch.float32, device=model.device)
    step = default_prompts_per_step(model)
    variants = [
        ("sam2's decoder (PointDecoder), 64 prompts per call", PointDecoder(model, True), 64),
        ("image side once per call, all 64 prompts in one step", FactoredPointDecoder(model, True), 64),
        (f"... in steps of {step} prompts", FactoredPointDecoder(model, True, step), 64),
        (f"... no masks for prompts failing the IoU filter ({iou_thresh})",
         FactoredPointDecoder(model, True, step, iou_gate=iou_thresh), 64),
    ]
    lines = ["| mask decoder | ms per prompt | x sam2's |", "|---|---|---|"]
    reference_ms = None
    for name, decoder, per_call in variants:
        with torch.inference_mode(), Stopwatch(device) as watch:
            for start in range(0, len(coords), per_call):
                decoder(*features, coords[start : start + per_call])
        ms = watch.seconds * 1000 / len(coords)
        reference_ms = reference_ms or ms
        lines.append(f"| {name} | {ms:.1f} | {reference_ms / ms:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint_dir", nargs="?",
                        help="folder with sam2.1_hiera_<size>.pt (default: the micro model)")
    parser.add_argument("model_type", nargs="?", choices=MODEL_TYPE_CHOICES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                        help="modes to run; the baseline always runs, first (default: all)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", help="image files")
    source.add_argument("--generated", type=int, default=2, help="generated scenes instead of files (default 2)")
    parser.add_argument("--size", type=int, nargs=2, default=[768, 1024], metavar=("H", "W"),
                        help="size of generated scenes (default 768 1024)")
    parser.add_argument("--rounds", type=int, default=1, help="times every image goes through every mode")
    parser.add_argument("--ablation", action="store_true",
                        help="also time the mask decoder's variants on the first image (a second table)")
    add_amg_options(parser)
    add_device_option(parser)
    args = parser.parse_args()
    if (args.checkpoint_dir is None) != (args.model_type is None):
        parser.error("give both CHECKPOINT_DIR and MODEL_TYPE, or neither (the default micro model)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    modes = ["baseline"] + [mode for mode in args.modes if mode != "baseline"]
    pipelines = {}
    for mode in modes:
        started = time.perf_counter()
        config = amg_config(parser, args, get_mode(mode))
        pipelines[mode] = load_pipeline(args.checkpoint_dir, args.model_type, mode, args.device, config=config)
        log.info("%s ready in %.1f s (points per batch %d)", mode, time.perf_counter() - started,
                 config.points_per_batch)
    images = load_images(args)
    runs = {mode: ModeRun(mode) for mode in modes}
    with tqdm(total=args.rounds * len(images) * len(modes), unit="request", file=sys.stderr) as progress:
        for _ in range(args.rounds):
            for index, (name, image) in enumerate(images):
                for mode in modes:
                    progress.set_description(f"{mode} on {name}")
                    run = runs[mode]
                    with PeakMemory(args.device) as memory, Stopwatch(args.device) as watch:
                        run.masks[index] = pipelines[mode].generator.generate(image)
                    run.seconds.append(watch.seconds)
                    run.peak_mib = max(run.peak_mib, memory.mib)
                    progress.update()

    loaded = pipelines["baseline"].loaded
    print(f"{loaded.description}; device {args.device} ({torch.get_num_threads()} CPU threads); "
          f"{len(images)} images ({', '.join(name for name, _ in images)}), "
          f"{args.points_per_side}x{args.points_per_side} grid, {args.rounds} round(s); torch {torch.__version__}")
    print(table(list(runs.values()), len(images)))
    if args.ablation:
        grid_points = args.points_per_side**2
        print(f"\nMask decoder alone, 64 of the {grid_points} grid points on {images[0][0]}, multimask output:")
        print(decoder_ablation(pipelines["baseline"], images[0][1], grid_points, args.pred_iou_thresh, args.device))


if __name__ == "__main__":
    main()
