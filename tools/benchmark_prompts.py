"""Interactive prompts: time to the first mask of a new image, and of an image already encoded.

    python -m tools.benchmark_prompts                          # the default micro model, 3 scenes
    python -m tools.benchmark_prompts ~/checkpoints/sam2 large --images photo.jpg

For each image: encode + one point prompt (a new image), one point on the encoded image (a
cached one), and 32 point prompts on it in one request; the same with sam2's
SAM2ImagePredictor (set_image + predict; predict alone; 32 predict calls, one per prompt, as
its API takes single prompt sets). Medians over the images and --repeats; in process, no HTTP.
"""

import statistics
import sys
from pathlib import Path

if not __package__:  # run by its path (python tools/benchmark_prompts.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import numpy as np
import torch

from sam2serve.amg import image_predictor
from sam2serve.checkpoints import load_model
from sam2serve.cli import (
    ScriptParser, add_checkpoint_arguments, add_device_option, add_threads_option, check_threads,
    checkpoint_from_arguments, positive_int, read_images, require_device, run_script, set_up_logging,
)
from sam2serve.cpu import set_up_cpu_process
from sam2serve.interactive import PromptSegmenter, parse_prompts
from sam2serve.timing import Stopwatch, device_description
from training.scenes import make_scene

PROMPTS_PER_REQUEST = 32


def point_prompts(image: np.ndarray, count: int, seed: int) -> list[list[float]]:
    height, width = image.shape[:2]
    rng = np.random.default_rng(seed)
    return [[float(rng.uniform(0, width)), float(rng.uniform(0, height))] for _ in range(count)]


def timed(device: str, function) -> float:
    with Stopwatch(device) as watch:
        function()
    return watch.seconds * 1000


def main() -> None:
    parser = ScriptParser(description=__doc__)
    add_checkpoint_arguments(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", nargs="+", help="image files (default: generated scenes)")
    source.add_argument("--generated", type=positive_int, default=3, help="generated 768x1024 scenes instead of files")
    parser.add_argument("--repeats", type=positive_int, default=3, help="times each measurement is taken per image")
    add_device_option(parser)
    add_threads_option(parser)
    args = parser.parse_args()
    set_up_logging()
    require_device(parser, args.device)
    check_threads(parser, args.threads)
    images = ([image for _, image in read_images(parser, args.images)] if args.images else
              [make_scene(np.random.default_rng(seed), 768, 1024).image for seed in range(2000, 2000 + args.generated)])
    path, model_type = checkpoint_from_arguments(parser, args)
    set_up_cpu_process(args.device, args.threads)  # as the server, before any thread starts
    loaded = load_model(path, model_type, args.device)
    segmenter = PromptSegmenter(loaded.model, "benchmark")
    predictor = image_predictor(loaded.model)
    rows: dict[str, list[float]] = {}

    def record(name: str, ms: float) -> None:
        rows.setdefault(name, []).append(ms)

    with torch.inference_mode():
        # Both once, untimed: the first calls' one-off costs would land in whichever runs first.
        segmenter.segment(segmenter.embed(images[0]), parse_prompts([{"points": [[1, 1]]}], images[0].shape[:2]))
        predictor.set_image(images[0])
        predictor.predict(np.array([[1.0, 1.0]]), np.array([1]), multimask_output=True)
        for index, image in enumerate(images):
            points = point_prompts(image, PROMPTS_PER_REQUEST, index)
            one = parse_prompts([{"points": points[:1]}], image.shape[:2])
            many = parse_prompts([{"points": [point]} for point in points], image.shape[:2])
            for _ in range(args.repeats):
                record("ours: new image (encode + 1 point)",
                       timed(args.device, lambda: segmenter.segment(segmenter.embed(image), one)))
                embedding = segmenter.embed(image)
                record("ours: cached image, 1 point", timed(args.device, lambda: segmenter.segment(embedding, one)))
                record(f"ours: cached image, {PROMPTS_PER_REQUEST} points in one request",
                       timed(args.device, lambda: segmenter.segment(embedding, many)))

                def sam2_new():
                    predictor.set_image(image)
                    predictor.predict(np.array(points[:1]), np.array([1]), multimask_output=True)

                record("sam2 predictor: set_image + predict", timed(args.device, sam2_new))
                record("sam2 predictor: predict, 1 point", timed(
                    args.device, lambda: predictor.predict(np.array(points[:1]), np.array([1]), multimask_output=True)))
                record(f"sam2 predictor: {PROMPTS_PER_REQUEST} predict calls", timed(args.device, lambda: [
                    predictor.predict(np.array([p]), np.array([1]), multimask_output=True) for p in points]))

    sizes = ", ".join(dict.fromkeys(f"{image.shape[1]}x{image.shape[0]}" for image in images))
    print(f"{loaded.description}; device {device_description(args.device)}; {len(images)} images ({sizes}), "
          f"{args.repeats} repeats; torch {torch.__version__}")
    print("| measurement | ms (median) |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.1f} |")
    new, cached = (statistics.median(rows[key]) for key in
                   ("ours: new image (encode + 1 point)", "ours: cached image, 1 point"))
    print(f"\nA cached image answers one point {new / cached:.1f}x faster than a new one.")
    sys.stdout.flush()


if __name__ == "__main__":
    run_script(main)
