r"""Bulk labelling on a Ray cluster: an image path list in, one RLE JSON line per image out.

The lines are those the xargs/curl workflow writes against server.py (the /upload_rle answer,
or the server's {"error": ...} for a file that is not an image), in the input order. Ray Data
spreads the images over GPU workers with `map_batches`; each worker is a `Segmenter` that
loads the model once and runs each batch through the pipeline's batched image encoder.

    python -m deploy.ray_bulk_job image_paths rle_masks --checkpoint-dir ~/checkpoints/sam2 --model-type large \
        --mode fast --workers 8 --batch-size 8

On a cluster, run it on the head node (or through `ray job submit`); without a cluster it
starts a local Ray instance. Each worker reads its images from its own machine's disk: on a
cluster, list paths on storage every node mounts (a path missing there answers
{"error": "the image file could not be read"}); a worker whose model does not load answers each
of its images with an error line saying why. On a CPU, give each core a worker (--workers 2 on 2
cores): Ray runs a worker's torch on one thread.
"""

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

if not __package__:  # run by its path (python deploy/ray_bulk_job.py): this checkout's packages, as -m has
    # them, here and in the Ray workers that a local Ray instance starts (they inherit the environment)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [sys.path[0], os.environ.get("PYTHONPATH")]))

from sam2serve.stops import Terminated, stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing torch: a stop then ends the script in one line
    stop_in_one_line_while_importing()

import numpy as np
import ray
from tqdm import tqdm

from sam2serve.cli import (
    ScriptParser, add_amg_options, add_checkpoint_arguments, add_option, amg_options,
    check_checkpoint_arguments, compile_modes, device_problem, error_of, error_text, listed_as, load_failure_line,
    positive_int, read_image_paths, report_error_lines, require_output_file, run_script, write_lines,
)
from deploy import cluster_device
from sam2serve.checkpoints import load_model, resolve_checkpoint
from sam2serve.modes import DEFAULT_MODE, MODES, get_mode, load_pipeline
from sam2serve.protocol import Limits, file_as_upload, rle_lines
from sam2serve.worker import ModelThread


class Segmenter:
    """A Ray Data worker: the model loaded once, then batches of paths -> answer lines.

    Ray Data builds the worker on the actor's main thread and runs its batches on a thread of its
    own. On a CPU, each thread that does parallel torch work gets an OpenMP pool of its own, and a
    second pool slows every operation (sam2serve/worker.py, "Which thread"): the model is loaded
    and run on one ModelThread, as in a Ray Serve replica."""

    def __init__(self, options: dict) -> None:
        self.model_thread = ModelThread("model")
        self.limits = Limits()
        try:
            self.pipeline = self.model_thread.submit(load_pipeline, **options).result()
        except Exception as error:  # noqa: BLE001 - every image's answer (cli.load_failure_line says why)
            traceback.print_exc()  # the worker's log
            self.pipeline, self.load_failure = None, load_failure_line("the worker", error)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        if self.pipeline is None:
            return {"path": list(batch["path"]), "line": [self.load_failure] * len(batch["path"])}
        files = [file_as_upload(path, self.limits) for path in batch["path"]]
        lines = self.model_thread.submit(rle_lines, self.pipeline.generator, files, self.limits).result()
        return {"path": list(batch["path"]), "line": lines}


def run(paths: list[str], output: Path, options: dict, workers: int, batch_size: int) -> list[tuple[str, str]]:
    """Writes one line per path into `output`, in the order of `paths` (into output.partial
    until the last line: a run that fails leaves an earlier output as it was); answers the path
    and error of each line that is one."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    uses_gpu = options["device"].startswith("cuda")
    dataset = ray.data.from_items([{"path": path} for path in paths]).map_batches(
        Segmenter,
        fn_constructor_kwargs={"options": {**options, "batch_size": batch_size}},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_gpus=1 if uses_gpu else 0,
    )
    failed = []

    def lines():
        for row in tqdm(dataset.iter_rows(), total=len(paths), desc="images", unit="image"):
            if (error := error_of(row["line"])) is not None:
                failed.append((row["path"], error))
            yield row["line"]

    write_lines(output, lines())
    return failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The job's arguments, checked; `args.options` is what each worker loads. On a cluster the
    workers' machines, not this one, have the GPUs: a CUDA device is checked there, and each
    worker sizes a fast mode's point batches by its own GPU's memory."""
    parser = ScriptParser(description=__doc__)
    # Names as given: Path("") would be the current folder, and an empty name (an unset
    # variable) would be told it is a folder.
    parser.add_argument("paths_file", help="one image path per line")
    parser.add_argument("output", help="one RLE JSON line per image, in order")
    add_checkpoint_arguments(parser, as_options=True)
    parser.add_argument("--mode", default=DEFAULT_MODE, choices=sorted(MODES), help="the server's modes")
    parser.add_argument("--device", help="the workers' device, cpu, cuda or cuda:N (default: cuda where the "
                        "cluster, or this machine without one, has GPUs; else cpu)")
    add_amg_options(parser)
    add_option(parser, "load_fast", help="exported kernels (fast modes)")
    add_option(parser, "compile_mode", choices=compile_modes(),
               help="fast modes: torch.compile's mode (default: max-autotune on CUDA; on a CPU, eager kernels)")
    parser.add_argument("--workers", type=positive_int, default=1, help="model replicas (one GPU each on CUDA)")
    add_option(parser, "batch_size", type=positive_int, default=4, help="images per worker batch")
    parser.add_argument("--address", help="Ray cluster address (default: a local instance or RAY_ADDRESS)")
    args = parser.parse_args(argv)
    check_checkpoint_arguments(parser, args)
    try:
        args.paths = read_image_paths(args.paths_file)
    except (OSError, ValueError) as error:
        parser.error(error_text(error))
    args.output = require_output_file(parser, args.output, "output", folder_made=True,
                                      inputs=[args.paths_file, *listed_as(args.output, args.paths)])
    if (args.load_fast is not None or args.compile_mode) and not get_mode(args.mode).compiled:
        parser.error("--load-fast and --compile-mode go with a fast mode: --mode fast or fast_furious")
    args.on_cluster = bool(args.address or os.environ.get("RAY_ADDRESS"))
    # Found now, not by every worker once the cluster runs (on a cluster, the folder may be the
    # workers' alone: only an empty one is refused there).
    if args.load_fast is not None and args.compile_mode:
        parser.error("give --compile-mode or --load-fast, not both: --load-fast loads exported kernels and compiles "
                     "nothing with torch.compile")
    if args.load_fast == "" or (args.load_fast and not args.on_cluster and not Path(args.load_fast).is_dir()):
        parser.error(f"--load-fast {args.load_fast!r}: no such folder (it takes the folder --save-fast wrote)")
    if args.device is not None and (problem := device_problem(args.device, here=not args.on_cluster)):
        parser.error(f"--device {args.device}: {problem}")
    args.options = dict(checkpoint_dir=args.checkpoint_dir, model_type=args.model_type, mode=args.mode,
                        device=args.device, amg=amg_options(parser, args), load_fast=args.load_fast,
                        compile_mode=args.compile_mode)
    return args


def main() -> None:
    args = parse_args()
    if not args.on_cluster:
        # Workers on this machine, most likely: a checkpoint that cannot be used is said here, in
        # one line, not by each worker's death after Ray starts (loading it costs seconds).
        load_model(*resolve_checkpoint(args.checkpoint_dir, args.model_type), "cpu")
    # ray.init puts Ray's own SIGTERM handlers in place (an exit with status 15, or an abort with
    # a stack dump, 134): the script's are put back (run_script's: one line, status 143).
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=args.address)
    except SystemExit as stop:  # SIGTERM while Ray started, to its Python handler
        if stop.code == signal.SIGTERM:
            raise Terminated() from None
        raise
    finally:
        if on_sigterm is not None:  # None: a handler from outside Python, not to be put back from here
            signal.signal(signal.SIGTERM, on_sigterm)
    options = {**args.options, "device": args.options["device"] or cluster_device()}
    print(f"{args.workers} worker(s) on {options['device']}, mode {args.mode}", file=sys.stderr)
    failed = run(args.paths, args.output, options, args.workers, args.batch_size)
    report_error_lines(args.paths, failed, args.output)  # e.g. relative paths a cluster's workers cannot find


if __name__ == "__main__":
    run_script(main)
