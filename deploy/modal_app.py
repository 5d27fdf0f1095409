"""The study on Modal: one H100 per container, the same pipeline code as server.py.

Checkpoints and exported fast-mode packages live on a Modal Volume, uploaded once; every
container loads them from there (an exported package loads in seconds instead of compiling).
Images are sent as file bytes and decoded on the container, as the server decodes uploads.
`modal_experiments.sh` drives it: deploy, replay an image list per mode, stop, compare. From the
repository's root:

    modal deploy -m deploy.modal_app
    modal volume put sam2-checkpoints ~/checkpoints/sam2/sam2.1_hiera_large.pt checkpoints/sam2.1_hiera_large.pt
    python -m deploy.modal_app replay image_paths out/ao_rle_masks --mode ao --model-type large
    modal app stop -y sam2-segment-everything

The image pins the versions of requirements.txt: torch and torchvision first (one CUDA build
for both), then the rest with --no-build-isolation so that sam2 builds against that torch.
"""

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import Callable

if not __package__:  # run by its path (python deploy/modal_app.py): this checkout's packages, as -m has them
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sam2serve.stops import stop_in_one_line_while_importing

if __name__ == "__main__":  # before the seconds of importing modal and torch: a stop then ends it in one line
    stop_in_one_line_while_importing()

import modal

APP_NAME = "sam2-segment-everything"
VOLUME_NAME = "sam2-checkpoints"
VOLUME_PATH = "/data"  # checkpoints in /data/checkpoints, exported packages in /data/exported
GPU = "H100"
# A call that fails on Modal is tried again; an image whose call still fails gets an error line in
# the replay's output instead of ending the whole replay. (A container that fails to start is not a
# failed call: Modal starts another, for as long as the app is deployed; see container_answerer.)
RETRIES = modal.Retries(max_retries=2, initial_delay=5.0)
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


def pinned(requirements: Path, *names: str) -> list[str]:
    """The pinned requirement lines of these packages (e.g. 'torch==2.15.0')."""
    lines = [line.split("#")[0].strip() for line in requirements.read_text().splitlines()]
    found = [line for line in lines if line.split("==")[0] in names]
    if len(found) != len(names):
        raise ValueError(f"{requirements} does not pin all of {names}")
    return found


image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(*pinned(REQUIREMENTS, "torch", "torchvision"), "setuptools", "wheel")  # sam2's build, as the Makefile
    .add_local_file(REQUIREMENTS, "/root/requirements.txt", copy=True)
    .run_commands("SAM2_BUILD_CUDA=0 pip install --no-build-isolation -r /root/requirements.txt")
    .add_local_python_source("sam2serve", "deploy")
)
app = modal.App(APP_NAME, image=image)
volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)


def open_pipeline(data_dir: str, model_type: str, mode: str, amg_json: str, load_fast: str, device: str):
    """The container's pipeline: checkpoint and exported kernels from the volume at data_dir."""
    from sam2serve.modes import load_pipeline

    return load_pipeline(
        checkpoint_dir=f"{data_dir}/checkpoints",
        model_type=model_type,
        mode=mode,
        device=device,
        amg=json.loads(amg_json),
        load_fast=f"{data_dir}/exported/{load_fast}" if load_fast else None,
    )


def answer_image(pipeline, image_bytes: bytes) -> str:
    """What server.py's /upload_rle answers for these file bytes: the RLE JSON or the error JSON."""
    from sam2serve.protocol import rle_lines

    return rle_lines(pipeline.generator, [image_bytes])[0]


def container_answerer(data_dir: str, model_type: str, mode: str, amg_json: str, load_fast: str,
                       device: str) -> Callable[[bytes], str]:
    """What a container answers each image with: answer_image on its pipeline or, where the
    pipeline does not load (its checkpoint missing from the volume, kernels exported for another
    model or torch, memory run out), that error's line for every image. A container of a deployed
    app whose start raises is started again by Modal for ever: the replay would wait for ever,
    paying for each start, instead of ending with the mode's error lines."""
    from sam2serve.cli import load_failure_line

    try:
        pipeline = open_pipeline(data_dir, model_type, mode, amg_json, load_fast, device)
    except Exception as error:  # noqa: BLE001 - every image's answer
        traceback.print_exc()  # the container's log
        line = load_failure_line("the container", error)
        return lambda image_bytes: line
    return functools.partial(answer_image, pipeline)


@app.cls(gpu=GPU, volumes={VOLUME_PATH: volume}, timeout=3600, scaledown_window=120, retries=RETRIES)
class Segmenter:
    """One model in one mode per container; `upload_rle` answers as the server's /upload_rle."""

    model_type: str = modal.parameter(default="large")
    mode: str = modal.parameter(default="ao")
    amg_json: str = modal.parameter(default="{}")  # AMG options, e.g. {"points_per_batch": 64}
    load_fast: str = modal.parameter(default="")  # a folder under /data/exported, fast modes

    @modal.enter()
    def load(self) -> None:
        self.answer = container_answerer(VOLUME_PATH, self.model_type, self.mode, self.amg_json, self.load_fast,
                                         "cuda")

    @modal.method()
    def upload_rle(self, image_bytes: bytes) -> str:
        return self.answer(image_bytes)


def replay(paths: list[str], output: Path, model_type: str, mode: str, amg: dict,
           load_fast: str) -> list[tuple[str, str]]:
    """Sends every image of the list to the deployed app; writes one line per image, in order
    (into output.partial until the last line: a run that fails leaves an earlier output as it was);
    answers the path and error of each line that is one. An image whose call failed on Modal
    (after RETRIES) gets an error line, as the server's for an image that failed: the others'
    lines are kept. A file over the server's upload limit is not sent: its line is the server's
    413 answer."""
    from tqdm import tqdm

    from sam2serve.cli import error_of, write_lines
    from sam2serve.protocol import Limits, UploadTooLarge, error_answer, json_text

    segmenter_class = modal.Cls.from_name(APP_NAME, "Segmenter")
    segmenter = segmenter_class(model_type=model_type, mode=mode, amg_json=json.dumps(amg), load_fast=load_fast)
    limits = Limits()
    sent = [Path(path).stat().st_size <= limits.max_upload_bytes for path in paths]
    # .map keeps the input order and spreads the images over the containers.
    answers = iter(segmenter.upload_rle.map((Path(path).read_bytes() for path, send in zip(paths, sent) if send),
                                            return_exceptions=True))
    failed = []

    def lines():
        for path, send in zip(paths, tqdm(sent, desc="images", unit="image")):
            answer = next(answers) if send else error_answer(UploadTooLarge(limits))[1]
            if isinstance(answer, BaseException):  # what Modal returns for a call that failed
                answer = json_text({"error": f"the Modal call failed: {type(answer).__name__}: {answer}"})
            if (error := error_of(answer)) is not None:
                failed.append((path, error))
            yield answer

    write_lines(output, lines())
    return failed


def main() -> None:
    from sam2serve.checkpoints import MODEL_TYPE_CHOICES
    from sam2serve.cli import (
        ScriptParser, add_amg_options, amg_options, checked_image_paths, error_text, listed_as, report_error_lines,
        require_output_file,
    )
    from sam2serve.modes import DEFAULT_MODE, MODES, get_mode

    parser = ScriptParser(description="Replay an image list through the deployed Modal app.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("replay", help="one RLE line per image into OUTPUT")
    command.add_argument("paths_file")  # as given: Path("") would be the current folder
    command.add_argument("output")
    command.add_argument("--model-type", default="large", choices=MODEL_TYPE_CHOICES,
                         help="the SAM2.1 size the app serves (default: %(default)s)")
    command.add_argument("--mode", default=DEFAULT_MODE, choices=sorted(MODES), help="default: %(default)s")
    add_amg_options(command)
    command.add_argument("--load-fast", default="", help="exported package folder under /data/exported")
    args = parser.parse_args()
    if args.load_fast and not get_mode(args.mode).compiled:  # before any image is sent (and paid for)
        command.error("--load-fast goes with a fast mode: --mode fast or fast_furious")
    args.output = require_output_file(command, args.output, "output", folder_made=True, inputs=[args.paths_file])
    try:
        paths = checked_image_paths(args.paths_file)  # before any image is sent (and paid for)
    except (OSError, ValueError) as error:
        command.error(error_text(error))
    require_output_file(command, args.output, "output", folder_made=True, inputs=listed_as(args.output, paths))
    try:
        failed = replay(paths, args.output, args.model_type, args.mode, amg_options(command, args), args.load_fast)
    except modal.exception.Error as error:  # no token, app not deployed, ...: Modal's own words
        sys.exit(f"error: {type(error).__name__}: {error}")
    report_error_lines(paths, failed, args.output)


if __name__ == "__main__":
    from sam2serve.cli import run_script

    run_script(main)
