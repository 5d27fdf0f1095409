"""Beyond one machine: the Modal app and script, the Ray Serve app and the Ray Data job.

No cloud here: the Modal script is checked with bash -n and shellcheck, the Modal app is
imported and its handler run locally; Ray runs as a local instance on CPU. Every front end
must answer byte for byte as the Flask server does (its app, in process) for the same image,
with the random tiny model and every candidate of a 4x4 grid kept (so answers are not empty).
"""

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam2serve.checkpoints import checkpoint_identity
from sam2serve.interactive import PromptSegmenter
from sam2serve.modes import load_pipeline
from sam2serve.rle import rles_to_masks
from sam2serve.protocol import (
    PAGE_SECURITY_POLICY, HeadersTooLarge, Limits, UploadTooLarge, error_answer, segment_coco,
)
from sam2serve.serving import create_app
from sam2serve.worker import InferenceWorker

from .conftest import counts_native_threads, make_scene, native_threads_added
from .test_server import free_port

REPO = Path(__file__).resolve().parents[1]
KEEP_EVERY_CANDIDATE = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                        "box_nms_thresh": 1.0}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale_images")
    for name, (h, w, seed) in {"a.jpg": (96, 128, 3), "b.png": (80, 60, 4), "c.jpg": (64, 64, 5)}.items():
        Image.fromarray(make_scene(h, w, seed=seed)).save(folder / name)
    (folder / "not_an_image.jpg").write_bytes(b"this is text")
    return folder


@pytest.fixture(scope="module")
def flask_client(tiny_checkpoint_dir):
    """The Flask server's app, in process, with the same pipeline the other front ends load."""
    pipeline = load_pipeline(tiny_checkpoint_dir, "tiny", "ao", amg=KEEP_EVERY_CANDIDATE)
    worker = InferenceWorker()
    worker.start(pipeline.generator, PromptSegmenter(pipeline.loaded.model, checkpoint_identity(pipeline.loaded.path)))
    return create_app(worker).test_client()


def flask_answer(client, endpoint: str, data: bytes) -> tuple[int, bytes]:
    response = client.post(endpoint, data={"image": (io.BytesIO(data), "image")})
    return response.status_code, response.get_data()


def test_modal_script_passes_bash_n_and_shellcheck():
    script = REPO / "modal_experiments.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).with_name("shellcheck"))
    result = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "modal_experiments.sh IMAGE_PATHS OUTPUT_DIR" in usage.stderr
    asked = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert asked.returncode == 0 and "modal_experiments.sh IMAGE_PATHS OUTPUT_DIR" in asked.stdout
    assert asked.stdout.rstrip().endswith("comparison failed (after making the others).")  # the header, whole
    too_many = subprocess.run(["bash", str(script), *"abcde"], capture_output=True, text=True)
    assert too_many.returncode == 2 and "error: expected IMAGE_PATHS OUTPUT_DIR [MODEL_TYPE] [MODES], got 5" \
        in too_many.stderr


def test_modal_script_deploys_then_uploads_replays_each_mode_and_compares(tmp_path):
    """The script against stand-ins for the modal command and for the replay (no cloud here):
    deploy first (it creates the volume on a new account), then the checkpoint's upload (its
    name from the project's table, aliases too), a replay per mode, the app stopped, each mode
    compared with the baseline; a checkpoint that is nowhere, or no baseline, said so."""
    stubs, log = tmp_path / "bin", tmp_path / "calls.log"
    stubs.mkdir()
    (stubs / "modal").write_text(f"""#!/bin/bash
echo "modal $*" >> {log}
if [[ $1 == volume && $2 == ls ]]; then  # piped, modal prints one path per line
    [[ -f {tmp_path}/on_volume ]] || exit 1  # nothing on the volume yet
    cat {tmp_path}/on_volume
fi
if [[ $1 == volume && $2 == get && $5 == - ]]; then  # a checkpoint's SHA-256 file, as sent before
    cat "{tmp_path}/volume/$(basename "$4")" || exit 1
    echo "✓ Finished downloading files to local!"  # as modal 1.6 writes after the bytes
fi
if [[ $1 == volume && $2 == rm ]]; then
    rm "{tmp_path}/volume/$(basename "$4")" || exit 1
fi
if [[ $1 == volume && $2 == put && $6 == *.sha256 ]]; then
    mkdir -p {tmp_path}/volume && cp "$5" "{tmp_path}/volume/$(basename "$6")"
fi
exit 0
""")
    (stubs / "python").write_text(f"""#!/bin/bash
if [[ $1 == -m && $2 == deploy.modal_app ]]; then
    echo "replay $6 $7 $8 $9" >> {log}
    [[ " ${{FAILED_REPLAYS:-}} " == *" $9 "* ]] && exit 1  # every image of the mode failed
    [[ " ${{STOPPED_REPLAYS:-}} " == *" $9 "* ]] && exit 143  # stopped (SIGTERM)
    mkdir -p "$(dirname "$5")"
    if [[ $9 == fast ]]; then echo '{{"error": "failed"}}' > "$5"; else echo '{{}}' > "$5"; fi  # fast: no comparison
    exit 0
fi
exec {sys.executable} "$@"
""")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "sam2.1_hiera_tiny.pt").write_bytes(b"weights")
    Image.new("RGB", (8, 6)).save(tmp_path / "a.jpg")
    (tmp_path / "paths").write_text("a.jpg\n")
    environment = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python"),
                   "CHECKPOINT_DIR": str(tmp_path / "ck"), "EXPORTED_DIR": str(tmp_path / "none")}

    def script(model_type: str, modes: str) -> subprocess.CompletedProcess:
        log.unlink(missing_ok=True)
        return subprocess.run(["bash", str(REPO / "modal_experiments.sh"), str(tmp_path / "paths"),
                               str(tmp_path / "out"), model_type, modes], env=environment, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    result = script("t", "baseline ao")
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[:4] == ["modal deploy -m deploy.modal_app",
                         "modal volume get sam2-checkpoints checkpoints/sam2.1_hiera_tiny.pt.sha256 -",
                         "modal volume rm sam2-checkpoints checkpoints/sam2.1_hiera_tiny.pt.sha256",  # none to remove
                         f"modal volume put --force sam2-checkpoints {tmp_path}/ck/sam2.1_hiera_tiny.pt "
                         "checkpoints/sam2.1_hiera_tiny.pt"]
    assert calls[4].startswith("modal volume put --force sam2-checkpoints ")  # its SHA-256, after it
    assert calls[4].endswith(" checkpoints/sam2.1_hiera_tiny.pt.sha256")
    sent_sum = (tmp_path / "volume" / "sam2.1_hiera_tiny.pt.sha256").read_text()
    assert sent_sum == hashlib.sha256(b"weights").hexdigest() + "\n"
    assert calls[5:] == ["replay --model-type t --mode baseline", "replay --model-type t --mode ao",
                         "modal app stop -y sam2-segment-everything"]
    assert "== ao vs baseline" in result.stdout
    uploads = lambda: [call for call in log.read_text().splitlines() if call.startswith("modal volume put")]  # noqa: E731
    # Sent again only when its bytes differ from those sent (a checkpoint trained again keeps its name).
    assert script("t", "ao").returncode == 0 and uploads() == []
    (tmp_path / "ck" / "sam2.1_hiera_tiny.pt").write_bytes(b"weights trained again")
    assert script("t", "ao").returncode == 0 and len(uploads()) == 2 and "/ck/sam2.1_hiera_tiny.pt " in uploads()[0]
    calls = log.read_text().splitlines()  # the old SHA-256 removed before the upload: a cut one leaves none
    assert calls.index("modal volume rm sam2-checkpoints checkpoints/sam2.1_hiera_tiny.pt.sha256") < calls.index(
        next(call for call in calls if call.startswith("modal volume put")))
    # With none here, the volume's is used: its whole name, not a leftover partial upload of it.
    environment["CHECKPOINT_DIR"] = str(tmp_path / "nowhere")
    for listing, found in [("checkpoints/sam2.1_hiera_tiny.pt.4242.partial\n", False),  # an upload cut short
                           ("checkpoints/sam2.1_hiera_tiny.pt\n", True), ("sam2.1_hiera_tiny.pt\n", True)]:
        (tmp_path / "on_volume").write_text(listing)
        result = script("t", "ao")
        assert (result.returncode == 0) == found and uploads() == [], listing
        assert found or "sam2.1_hiera_tiny.pt is neither on the volume" in result.stderr
    (tmp_path / "on_volume").unlink()
    environment["CHECKPOINT_DIR"] = str(tmp_path / "ck")

    result = script("small", "baseline")
    assert result.returncode == 1 and "sam2.1_hiera_small.pt is neither on the volume" in result.stderr
    assert log.read_text().splitlines()[-1] == "modal app stop -y sam2-segment-everything"
    result = script("tiny", "ao")
    assert result.returncode == 0 and "no baseline among the modes" in result.stdout
    # A comparison that fails (fast's one image failed) leaves the next to be made, and the script exits 1; an
    # exported folder is sent for a fast mode alone (ao's would make its replay refuse --load-fast).
    for mode in ("ao", "fast"):
        (tmp_path / "exported" / mode).mkdir(parents=True)
    environment["EXPORTED_DIR"] = str(tmp_path / "exported")
    result = script("t", "baseline\tfast ao")  # (a tab was read as part of a mode's name: no baseline)
    assert result.returncode == 1 and result.stdout.index("== fast vs baseline") < result.stdout.index("== ao vs"), \
        result.stdout + result.stderr
    assert [call for call in uploads() if "exported" in call] == [
        f"modal volume put --force sam2-checkpoints {tmp_path}/exported/fast exported/fast"]
    # A replay that fails (every image answered an error) leaves the other modes to run and compare; the
    # script exits 1. With the baseline's failed, nothing is compared.
    environment["FAILED_REPLAYS"] = "fast"
    (tmp_path / "out" / "fast" / "rle_masks").unlink()
    result = script("t", "baseline fast ao")
    assert result.returncode == 1 and "the replay through fast failed" in result.stderr, result.stderr
    assert "replay --model-type t --mode ao" in log.read_text() and "== ao vs baseline\n" in result.stdout
    assert "== fast vs baseline: not compared" in result.stdout
    assert log.read_text().splitlines()[-1] == "modal app stop -y sam2-segment-everything"
    environment["FAILED_REPLAYS"] = "baseline"
    result = script("t", "baseline ao")
    assert result.returncode == 1 and "the baseline's replay failed: nothing to compare" in result.stderr
    assert "replay --model-type t --mode ao" in log.read_text() and "vs baseline" not in result.stdout
    environment["FAILED_REPLAYS"] = "ao"
    result = script("t", "ao")
    assert result.returncode == 1 and "no baseline among the modes" in result.stdout
    environment.pop("FAILED_REPLAYS")
    # A replay stopped (a time limit's SIGTERM) stops the study: no other mode runs (and pays).
    environment["STOPPED_REPLAYS"] = "baseline"
    result = script("t", "baseline ao")
    assert result.returncode == 143 and "replay --model-type t --mode ao" not in log.read_text(), result.stderr
    assert log.read_text().splitlines()[-1] == "modal app stop -y sam2-segment-everything"
    environment.pop("STOPPED_REPLAYS")
    # The project's micro model: from models/, where it is committed, unless CHECKPOINT_DIR says.
    environment.pop("CHECKPOINT_DIR")
    result = script("micro", "ao")
    assert result.returncode == 0, result.stderr
    assert (f"modal volume put --force sam2-checkpoints {REPO}/models/sam2.1_hiera_micro.pt "
            "checkpoints/sam2.1_hiera_micro.pt") in log.read_text().splitlines()

    # Mistakes end the script before it deploys (and pays), in one line each.
    (tmp_path / "paths_with_a_gap").write_text("a.jpg\nb.jpg\n")
    for model_type, modes, paths, message in [("t", "baseline fastt", "paths", "unknown mode 'fastt'"),
                                              ("huge", "baseline", "paths", "unknown model type 'huge'"),
                                              ("t", "  ", "paths", "no mode given"),
                                              ("t", "baseline ao ao", "paths", "mode 'ao' given twice"),
                                              ("t", "baseline", "paths_with_a_gap",
                                               "1 of the 2 listed images do not exist as files"),
                                              ("t", "baseline", "absent", "No such file")]:
        (tmp_path / "paths_used").write_text((tmp_path / paths).read_text() if (tmp_path / paths).exists() else "")
        if paths == "absent":
            (tmp_path / "paths_used").unlink()
        log.unlink(missing_ok=True)
        result = subprocess.run(["bash", str(REPO / "modal_experiments.sh"), str(tmp_path / "paths_used"),
                                 str(tmp_path / "out"), model_type, modes], env=environment, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and message in result.stderr, (modes, result.stderr)
        assert "Traceback" not in result.stderr and not log.exists()  # no modal command at all


def test_modal_script_stopped_ends_its_replay_before_stopping_the_app(tmp_path):
    """SIGTERM sent to the script alone (a time limit, `kill`): the replay under way ends too,
    before the app is stopped, instead of going on writing its output."""
    stubs, log = tmp_path / "bin", tmp_path / "calls.log"
    stubs.mkdir()
    (stubs / "modal").write_text(f"""#!/bin/bash
echo "modal $*" >> {log}
[[ $1 == volume && $2 == ls ]] && echo checkpoints/sam2.1_hiera_tiny.pt
exit 0
""")
    (stubs / "python").write_text(f"""#!/bin/bash
if [[ $1 == -m && $2 == deploy.modal_app ]]; then
    echo "replay $$" >> {log}
    exec sleep 60
fi
exec {sys.executable} "$@"
""")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    Image.new("RGB", (8, 6)).save(tmp_path / "a.jpg")
    (tmp_path / "paths").write_text("a.jpg\n")
    environment = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "PYTHON": str(stubs / "python"),
                   "CHECKPOINT_DIR": str(tmp_path / "nowhere")}
    script = subprocess.Popen(["bash", str(REPO / "modal_experiments.sh"), "paths", "out", "tiny", "baseline ao"],
                              env=environment, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    replay = None
    try:
        deadline = time.monotonic() + 60
        while replay is None:
            assert time.monotonic() < deadline and script.poll() is None, script.stderr.read() if script.poll() else ""
            replay = next((int(line.split()[1]) for line in (log.read_text().splitlines() if log.exists() else [])
                           if line.startswith("replay ")), None)
            time.sleep(0.05)
        script.send_signal(signal.SIGTERM)
        script.communicate(timeout=30)
        assert script.returncode == 143
        with pytest.raises(ProcessLookupError):  # ended (and waited for) before the script exited
            os.kill(replay, 0)
        calls = log.read_text().splitlines()
        assert calls[-1] == "modal app stop -y sam2-segment-everything"
        assert sum(call.startswith("replay ") for call in calls) == 1  # no other mode started
    finally:
        script.kill()
        if replay is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(replay, signal.SIGKILL)


def test_modal_app_defines_what_the_script_calls_and_answers_like_the_server(
    tiny_checkpoint_dir, image_files, flask_client, tmp_path
):
    import modal

    from deploy import modal_app

    assert isinstance(modal_app.app, modal.App) and modal_app.app.name == modal_app.APP_NAME
    script = (REPO / "modal_experiments.sh").read_text()
    assert f"app_name={modal_app.APP_NAME}" in script and f"volume={modal_app.VOLUME_NAME}" in script
    assert "-m deploy.modal_app replay" in script
    # The image pins what requirements.txt pins.
    requirements = (REPO / "requirements.txt").read_text()
    assert all(pin in requirements for pin in modal_app.pinned(modal_app.REQUIREMENTS, "torch", "torchvision"))

    # The container's handler, run here on CPU, with the volume's layout in a folder.
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt", tmp_path / "checkpoints")
    answer = modal_app.container_answerer(str(tmp_path), "tiny", "ao", json.dumps(KEEP_EVERY_CANDIDATE), "", "cpu")
    for path in sorted(image_files.iterdir()):
        line = answer(path.read_bytes())
        status, body = flask_answer(flask_client, "/upload_rle", path.read_bytes())
        assert line.encode() == body, path.name
        assert (status == 200) == (path.name != "not_an_image.jpg")
    # A container whose pipeline does not load answers every image its error line: its start does
    # not raise (Modal would start it again and again, the replay waiting for ever).
    answer = modal_app.container_answerer(str(tmp_path), "micro", "ao", "{}", "", "cpu")  # not on the volume
    line = json.loads(answer(path.read_bytes()))
    assert line["error"].startswith("the container could not load its model: CheckpointUnavailable: "), line
    assert "sam2.1_hiera_micro.pt" in line["error"] and json.loads(answer(b"")) == line
    # Exported kernels of another build: every difference is in the line, not the first line's "something else:".
    (tmp_path / "exported" / "other").mkdir(parents=True)
    (tmp_path / "exported" / "other" / "manifest.json").write_text(json.dumps(
        {"checkpoint": "sam2.1_hiera_tiny.pt#0", "image_size": 1024, "dtype": "float32", "points_per_batch": 1024,
         "batch_size": 1, "multimask_output": True, "device": "cpu", "gpu_architecture": "",
         "cpu_target": "native", "cpu_instruction_sets": "", "torch_version": torch.__version__, "files": {}}))
    answer = modal_app.container_answerer(str(tmp_path), "tiny", "fast", "{}", "other", "cpu")
    error = json.loads(answer(path.read_bytes()))["error"]
    assert error.startswith("the container could not load its model: PackageMismatch: the exported kernels in "), error
    assert "were built for something else: checkpoint: package 'sam2.1_hiera_tiny.pt#0', server " in error
    assert "; points_per_batch: package 1024, server " in error and error.endswith("; export them again for this "
                                                                                 "server with --save-fast")


def test_modal_replay_answers_an_error_line_for_a_call_that_failed_and_keeps_the_others(
    monkeypatch, tmp_path, capsys
):
    """The replay against a stand-in for the deployed class (no cloud here) that behaves as
    Modal's .map: answers in input order, and a call that failed (after the class's retries)
    raised in the stream, or returned there when asked with return_exceptions."""
    import modal

    from deploy import modal_app

    class FailedCall(Exception):
        pass

    class UploadRle:
        def map(self, inputs, return_exceptions=False):
            for data in inputs:
                assert len(data) < 100  # a file over the upload limit is not sent
                if data == b"lost":
                    if not return_exceptions:
                        raise FailedCall("container lost")
                    yield FailedCall("container lost")
                else:
                    yield json.dumps({"mask_0": data.decode()})

    class Segmenter:
        def __init__(self, **parameters):
            self.upload_rle = UploadRle()

    monkeypatch.setattr(modal.Cls, "from_name", lambda app_name, name: Segmenter)
    paths = []
    for name in ("a", "lost", "huge", "b"):
        (tmp_path / name).write_bytes(name.encode())
        paths.append(str(tmp_path / name))
    os.truncate(paths[2], Limits().max_upload_bytes + 1)  # sparse: no disk used
    output = tmp_path / "out" / "rle_masks"
    failed = modal_app.replay(paths, output, "tiny", "ao", {}, "")
    lines = output.read_text().splitlines()
    assert lines[0] == '{"mask_0": "a"}' and lines[3] == '{"mask_0": "b"}'
    assert json.loads(lines[1]) == {"error": "the Modal call failed: FailedCall: container lost"}
    assert lines[2] == error_answer(UploadTooLarge(Limits()))[1]  # the server's 413
    assert failed == [(paths[1], "the Modal call failed: FailedCall: container lost"),
                      (paths[2], json.loads(lines[2])["error"])]
    assert isinstance(modal_app.RETRIES, modal.Retries) and modal_app.RETRIES.max_retries >= 1

    # The summary the command prints, as the Ray Data job's, with the first error; status 1 when
    # every image failed.
    from sam2serve.cli import report_error_lines

    capsys.readouterr()  # the replay's progress bar
    report_error_lines(paths, failed, output)
    assert capsys.readouterr().err == (f"wrote 4 lines to {output}\n2 of 4 images answered an error line, e.g. "
                                       f"{paths[1]} (the Modal call failed: FailedCall: container lost), {paths[2]}\n")
    report_error_lines(paths[:1], [], output)
    assert capsys.readouterr().err == f"wrote 1 line to {output}\n"
    with pytest.raises(SystemExit) as stopped:
        report_error_lines(paths[1:3], failed, output)
    assert stopped.value.code == 1


def test_modal_replay_asks_for_its_settings_and_sends_a_file_of_exactly_the_upload_limit(monkeypatch, tmp_path):
    """The deployed class is asked for the replay's model, mode, AMG options and exported
    package; a file of exactly the upload limit is sent (one byte more is the 413 line); the
    container opens the package under the volume's exported/ folder; a package the image does
    not pin is refused."""
    import modal

    from deploy import modal_app

    asked, sent = [], []

    class Segmenter:
        def __init__(self, **parameters):
            asked.append(parameters)
            self.upload_rle = self

        def map(self, inputs, return_exceptions=False):
            for data in inputs:
                sent.append(len(data))
                yield "{}"

    monkeypatch.setattr(modal.Cls, "from_name", lambda app_name, name: Segmenter)
    path = tmp_path / "at_limit.jpg"
    path.write_bytes(b"")
    os.truncate(path, Limits().max_upload_bytes)  # sparse: no disk used
    failed = modal_app.replay([str(path)], tmp_path / "out", "small", "fast", {"points_per_side": 8}, "small_fast")
    assert failed == [] and sent == [Limits().max_upload_bytes]
    assert asked == [{"model_type": "small", "mode": "fast", "amg_json": '{"points_per_side": 8}',
                      "load_fast": "small_fast"}]

    import sam2serve.modes

    opened = []
    monkeypatch.setattr(sam2serve.modes, "load_pipeline", lambda **options: opened.append(options))
    modal_app.open_pipeline("/data", "small", "fast", "{}", "small_fast", "cuda")
    modal_app.open_pipeline("/data", "small", "ao", "{}", "", "cuda")
    assert [options["load_fast"] for options in opened] == ["/data/exported/small_fast", None]
    with pytest.raises(ValueError, match="does not pin all of"):
        modal_app.pinned(modal_app.REQUIREMENTS, "torch", "not-a-requirement")


def test_modal_replay_refuses_exported_kernels_for_a_mode_that_runs_none(tmp_path):
    """Checked before any image is sent: each container would have failed at start, on paid GPUs,
    and every image answered an error line."""
    (tmp_path / "paths").write_text(str(REPO / "examples" / "shapes.jpg") + "\n")
    result = subprocess.run([sys.executable, str(REPO / "deploy" / "modal_app.py"), "replay", str(tmp_path / "paths"),
                             str(tmp_path / "out"), "--mode", "ao", "--load-fast", "large_ao"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--load-fast goes with a fast mode: --mode fast or fast_furious" in result.stderr
    assert not (tmp_path / "out").exists()


def test_result_lines_are_written_whole_or_not_at_all(tmp_path, capsys):
    """The bulk job's and the Modal replay's output: a run that fails (no token, a lost cluster)
    leaves the earlier output as it was."""
    from sam2serve.cli import write_lines

    def failing_after(lines):
        yield from lines
        raise RuntimeError("connection lost")

    output = tmp_path / "rle_masks"
    output.write_text("earlier\n")
    with pytest.raises(RuntimeError):
        write_lines(output, failing_after([]))
    assert output.read_text() == "earlier\n" and [file.name for file in tmp_path.iterdir()] == ["rle_masks"]
    with pytest.raises(RuntimeError):
        write_lines(output, failing_after(["a"]))
    assert output.read_text() == "earlier\n" and (tmp_path / "rle_masks.partial").read_text() == "a\n"
    assert capsys.readouterr().err == f"lines written before the run ended: 1, in {output}.partial\n"
    write_lines(output, iter(["a", "b"]))
    assert output.read_text() == "a\nb\n" and [file.name for file in tmp_path.iterdir()] == ["rle_masks"]


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    # A Ray of its own: not a cluster RAY_ADDRESS names, or one `ray start` left running
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def assert_close_json(ours, theirs, where: str = "", atol: float = 1e-5) -> None:
    """The same JSON, its floats to float rounding: the replica runs torch on Ray's threads for it
    (its num_cpus), this process on one per core, and a score's last bits depend on the count."""
    if isinstance(ours, float) or isinstance(theirs, float):
        assert ours == pytest.approx(theirs, abs=atol), where
    elif isinstance(ours, dict) and isinstance(theirs, dict):
        assert ours.keys() == theirs.keys(), where
        for key in ours:
            assert_close_json(ours[key], theirs[key], f"{where}.{key}", atol)
    elif isinstance(ours, list) and isinstance(theirs, list):
        assert len(ours) == len(theirs), where
        for index, (a, b) in enumerate(zip(ours, theirs)):
            assert_close_json(a, b, f"{where}[{index}]", atol)
    else:
        assert ours == theirs, where


def port_no_connection_takes() -> int:
    """A free port between Ray's worker ports (up to 19999) and the kernel's range for outgoing
    connections. Ray Serve's proxy binds the port it is given seconds after it is chosen, and a
    port from bind(0) lies in that range, where a connection Ray opens meanwhile could take it."""
    try:
        first_outgoing = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:  # no /proc: no range to keep clear of, known
        return free_port()
    if first_outgoing <= 20000:  # a kernel set to hand out low ports: nothing to keep clear of
        return free_port()
    for port in random.sample(range(20000, first_outgoing), min(100, first_outgoing - 20000)):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


def test_ray_serve_answers_both_endpoints_as_the_flask_server(
    local_ray, tiny_checkpoint_dir, image_files, flask_client
):
    from ray import serve

    from tools.load_test import post_image
    from deploy.ray_serve_app import build

    port = port_no_connection_takes()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    arguments = {"checkpoint_dir": str(tiny_checkpoint_dir), "model_type": "tiny", "mode": "ao", "device": "cpu",
                 "batch_size": "2", "cpus": "2", "connection_timeout": "2",
                 **{name: str(value) for name, value in KEEP_EVERY_CANDIDATE.items()}}
    try:
        serve.run(build(arguments), name="sam2", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        for path in sorted(image_files.iterdir()):
            for endpoint in ("/upload_rle", "/upload"):
                status, _, body = post_image(url + endpoint, path.read_bytes(), path.name, timeout_s=120)
                assert (status, body) == flask_answer(flask_client, endpoint, path.read_bytes()), (path.name, endpoint)
        data = (image_files / "a.jpg").read_bytes()
        for endpoint in ("/upload_rle?format=coco", "/upload?format=coco", "/upload_rle?box_nms_thresh=0.5",
                         "/upload?format=png&box_nms_thresh=0.5", "/upload_rle?format=coco&pred_iou_thresh=0.1"):
            answer = post_image(url + endpoint, data, "a.jpg", timeout_s=120)
            status, expected = flask_answer(flask_client, endpoint, data)
            assert answer[0] == status, endpoint
            if "format=coco" in endpoint and endpoint.startswith("/upload_rle"):  # scores to float rounding
                assert_close_json(json.loads(answer[2]), json.loads(expected), endpoint)
            else:
                assert answer[2] == expected, endpoint
        assert flask_answer(flask_client, "/upload_rle?box_nms_thresh=0.5", data) != flask_answer(
            flask_client, "/upload_rle", data)  # the request's own setting counts
        # Prompts: /embed, then /segment by id and in one multipart request.
        from tools.load_test import post

        data = (image_files / "a.jpg").read_bytes()
        status, _, embedded = post_image(url + "/embed", data, "a.jpg", timeout_s=120)
        assert (status, embedded) == flask_answer(flask_client, "/embed", data)
        prompts = [{"points": [[40, 30]]}, {"box": [10, 10, 90, 70]}]
        body = json.dumps({"image_id": json.loads(embedded)["image_id"], "prompts": prompts}).encode()
        ray_answer = post(url + "/segment", body, "application/json", 120)
        flask_segment = flask_client.post("/segment", data=body, content_type="application/json")
        # The replica runs torch with other thread counts: the same numbers to float rounding.
        assert ray_answer[0] == 200
        ours, theirs = json.loads(ray_answer[2]), flask_segment.get_json()
        assert ours["image_id"] == theirs["image_id"] and len(ours["results"]) == len(theirs["results"]) == 2
        for a, b in zip(ours["results"], theirs["results"]):
            np.testing.assert_allclose(a["iou_predictions"], b["iou_predictions"], atol=1e-5)
            assert (rles_to_masks(a["masks"]) != rles_to_masks(b["masks"])).mean() < 1e-4
        ray_coco = post(url + "/segment?format=coco", body, "application/json", 120)  # the same masks, as COCO
        assert ray_coco[0] == 200 and json.loads(ray_coco[2]) == segment_coco(ours)
        one_shot = flask_client.post("/segment", data={"image": (io.BytesIO(data), "a.jpg"), "prompts": json.dumps(prompts)})
        assert one_shot.get_data() == flask_segment.get_data()
        from .test_http_front import multipart

        for endpoint in ("/upload_rle", "/embed"):  # the image as the body: as in a form, as server.py answers
            for content_type in ("image/jpeg", "application/octet-stream"):
                raw = post(url + endpoint, data, content_type, 120)
                assert (raw[0], raw[2]) == flask_answer(flask_client, endpoint, data), (endpoint, content_type)
        ray_one_shot = post(url + "/segment", *multipart([("image", "a.jpg", data),
                                                          ("prompts", None, json.dumps(prompts).encode())]), 120)
        assert ray_one_shot[0] == 200 and json.loads(ray_one_shot[2])["image_id"] == ours["image_id"]
        # Prompts gone wrong: the Flask server's status and message.

        image_id = json.loads(embedded)["image_id"]
        for body, content_type in [
            (json.dumps({"image_id": image_id, "prompts": [{"points": [[40, 30]], "mask_input": image_id}]}).encode(),
             "application/json"),
            (b"[" * 100_000 + b"]" * 100_000, "application/json"),
            multipart([("image", "a.jpg", data), ("prompts", None, json.dumps(prompts).encode()),
                       ("image_id", None, image_id.encode())]),
            multipart([("image", "a.jpg", data), ("prompts", None, json.dumps(prompts).encode()),
                       ("mask", "m.png", data)]),  # a file of another name
            multipart([("image", "a.jpg", data), ("prompts", "p.json", json.dumps(prompts).encode())]),
        ]:
            ray_error = post(url + "/segment", body, content_type, 60)
            flask_error = flask_client.post("/segment", data=body, content_type=content_type)
            assert (ray_error[0], ray_error[2]) == (flask_error.status_code, flask_error.get_data()), ray_error
            assert ray_error[0] in (400, 404)
        assert_same_error_answers_as_flask(url, flask_client)
        for path in ("/", "/static/app.js", "/static/style.css"):  # the web page, as server.py serves it
            with urllib.request.urlopen(url + path, timeout=30) as response:
                page = flask_client.get(path)
                assert response.read() == page.get_data() and response.headers.get_content_type() == page.mimetype
                # and GET /'s Content-Security-Policy (the script and the style have none)
                assert response.headers["Content-Security-Policy"] == page.headers.get("Content-Security-Policy") \
                    == (PAGE_SECURITY_POLICY if path == "/" else None)
        # Under a route prefix (the config file's route_prefix), the same answers below it.
        serve.run(build(arguments), name="sam2", route_prefix="/sam2")
        with urllib.request.urlopen(url + "/sam2", timeout=30) as response:  # to /sam2/: the page's links are relative
            assert response.url == url + "/sam2/" and response.read() == flask_client.get("/").get_data()
        status, _, body = post_image(url + "/sam2/upload_rle", data, "a.jpg", timeout_s=120)
        assert (status, body) == flask_answer(flask_client, "/upload_rle", data)
    finally:
        serve.shutdown()


def assert_same_error_answers_as_flask(url: str, flask_client) -> None:
    """Malformed forms, forms over the limits, a wrong method and an upload over the limit sent
    without a Content-Length get the Flask server's status, and its message where it has one."""
    import http.client
    from urllib.parse import urlparse

    from tools.load_test import post

    from .test_http_front import multipart

    image = ("image", "a.png", (REPO / "examples" / "shapes.jpg").read_bytes())
    forms = {
        "too many parts": multipart([image] + [(f"f{i}", None, b"x") for i in range(1200)]),
        "text field too large": multipart([image, ("prompts", None, b"x" * 600_000)]),
        "not a form": (b"garbage", "multipart/form-data; boundary=b"),
        "no boundary": (b"garbage", "multipart/form-data"),
        "another multipart type": (b"garbage", "multipart/mixed; boundary=b"),
        "path without @": multipart([("image", None, b"shapes.jpg")]),
        "raw image, empty": (b"", "image/jpeg"),
        "raw image, not an image": (b"garbage", "application/octet-stream"),
        "a form with an image's type": (multipart([image])[0], "image/jpeg; boundary=b"),
        "a part without a name": multipart([image, (None, None, b"x")]),
        "a setting as a form field": multipart([image, ("pred_iou_thresh", None, b"0.6")]),
        "image as a file and as text": multipart([image, ("image", None, b"x")]),
        "another file": multipart([image, ("mask", "m.png", image[2])]),
        # Starlette counts fields and files apart, 1000 of each: 2000 parts were taken.
        "1000 fields and 1000 files": multipart([image] + [(f"f{i}", None, b"x") for i in range(1000)]
                                                + [(f"g{i}", "g", b"x") for i in range(999)]),
        # curl --data-binary @photo.jpg: each '&' of it a part for Starlette (a 413 "more than 1000 parts")
        "a photo as the body": (np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes(),
                                "application/x-www-form-urlencoded"),
        "600 kB after the form's last line": (multipart([image])[0] + b"x" * 600_000, multipart([image])[1]),
    }
    for case, (body, content_type) in forms.items():
        status, _, answer = post(url + "/upload_rle", body, content_type, 60)
        flask = flask_client.post("/upload_rle", data=body, content_type=content_type)
        assert status == flask.status_code and status in (400, 413), (case, status, answer)
        if status == 413 or case in ("path without @", "raw image, empty", "raw image, not an image",
                                     "a form with an image's type",
                                     "another multipart type", "a part without a name",
                                     "a setting as a form field", "image as a file and as text",
                                     "another file", "a photo as the body"):  # the same message as well
            assert answer == flask.get_data(), case
    # Settings refused; a subnormal number is 0 in both (Ray's event loop, which flushes no
    # denormals, took 1e-310 for above 0, and its model thread refused it: a 500).
    for query in ("?pred_iou=0.5", "?box_nms_thresh=2", "?format=coco&stability_score_thresh=x",
                  "?stability_score_offset=1e-310"):
        status, _, answer = post(url + "/upload_rle" + query, *multipart([image]), 60)
        flask = flask_client.post("/upload_rle" + query, data=multipart([image])[0], content_type=multipart([image])[1])
        assert (status, answer) == (400, flask.get_data()) and flask.status_code == 400, query
    for long_url in ("/health?q=" + "a" * 9000, "/" + "%41" * 3000, "/sam2/upload_rle?" + "b" * 9000):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + long_url, timeout=30)
        flask = flask_client.get(long_url)
        assert (refused.value.code, refused.value.read()) == (414, flask.get_data()) and flask.status_code == 414
    response = flask_client.get("/upload_rle")
    with urllib.request.urlopen(url + "/health", timeout=30) as health:  # server.py's fields, in its order
        assert health.headers["X-Content-Type-Options"] == "nosniff"
        assert list(json.loads(health.read())) == ["status", "queued", "mode", "device", "batch_size", "amg", "model",
                                                   "weights", "threads", "kernels", "prompts"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "/upload_rle", timeout=30)
    assert (refused.value.code, refused.value.read()) == (405, response.get_data())
    assert "POST" in refused.value.headers["Allow"] and refused.value.headers["X-Content-Type-Options"] == "nosniff"

    # A body that stops arriving: the connection timeout's 408 (connection_timeout=2), in server.py's
    # words; Ray's proxy waited for it without end.
    address = urlparse(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as stalled:
        body, content_type = multipart([image])
        stalled.sendall(f"POST /upload_rle HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
                        f"Content-Length: {len(body) + 10}\r\n\r\n".encode() + body)
        started, answer = time.monotonic(), b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += stalled.recv(65536) or b"}"
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 20, answer[:300]
    assert answer.endswith(b'{"error":"request timeout: nothing received for 2 s"}'), answer[-300:]

    limit = 50 * 2**20  # the upload limit, sent in chunks: no Content-Length to refuse it by
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
    chunks = (b"x" * 2**20 for _ in range(limit // 2**20 + 1))
    connection.request("POST", "/upload_rle", body=chunks, encode_chunked=True,
                       headers={"Content-Type": "multipart/form-data; boundary=b"})
    answer = connection.getresponse()
    assert answer.status == 413 and b"upload larger than the limit" in answer.read()
    connection.close()
    # A body announced over the limit, on any route and method: refused before it is read, as
    # server.py's HTTP server does (Ray answered a GET /health that announced 60 MB with 200).
    for request_line in ("GET /health", "POST /nowhere"):
        with socket.create_connection((address.hostname, address.port), timeout=30) as announced:
            announced.sendall(f"{request_line} HTTP/1.1\r\nHost: test\r\nContent-Length: {60 * 2**20}\r\n\r\n".encode())
            answer = b""
            while not answer.endswith(b"}"):
                answer += announced.recv(65536) or b"}"
            assert announced.recv(1) == b""  # its connection closed, as server.py's: the body is not read
        assert answer.startswith(b"HTTP/1.1 413"), (request_line, answer[:300])
        assert answer.endswith(error_answer(UploadTooLarge(Limits()))[1].encode()), (request_line, answer[-300:])
    # Request line and headers over server.py's limit: its 431 (Ray's proxy has no limit of its own).
    with socket.create_connection((address.hostname, address.port), timeout=30) as padded:
        padded.sendall(f"GET /health HTTP/1.1\r\nHost: test\r\nX-Pad: {'a' * 70_000}\r\n\r\n".encode())
        answer = b""
        while not answer.endswith(b"}"):
            answer += padded.recv(65536) or b"}"
    assert answer.startswith(b"HTTP/1.1 431") and answer.endswith(error_answer(HeadersTooLarge(65536))[1].encode())


def test_ray_serve_config_file_names_the_app_and_valid_arguments():
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("ray")
    from deploy import ray_serve_app

    config = yaml.safe_load((REPO / "deploy" / "ray_serve_config.yaml").read_text())
    assert config["http_options"]["port"] != 8000
    (application,) = config["applications"]
    module, name = application["import_path"].split(":")
    assert module == "deploy.ray_serve_app" and getattr(ray_serve_app, name) is ray_serve_app.build
    ray_serve_app.build(application["args"])  # every argument known and valid


def test_ray_serve_arguments_are_checked_before_a_replica_starts():
    pytest.importorskip("ray")
    from deploy.ray_serve_app import build

    for arguments, message in [
        ({"pointz_per_side": "4"}, "unknown arguments"),
        ({"mode": "turbo"}, "unknown mode 'turbo'"),
        ({"checkpoint_dir": "x", "model_type": "huge"}, "unknown model type 'huge'"),
        ({"points_per_side": "0"}, "points_per_side must be at least 1"),
        ({"points_per_side": "abc"}, "points_per_side: expected a whole number, got 'abc'"),
        ({"batch_size": "x"}, "batch_size=x: expected a number"),
        ({"replicas": "0"}, "replicas=0"),
        ({"replicas": "\u00b2"}, "replicas=\u00b2: a number of 1 or more"),  # a digit to str.isdigit, not to int()
        ({"replicas": "2", "max_replicas": "8"}, "max_replicas goes with replicas=auto"),
        ({"mode": "fast", "load_fast": " "}, "load_fast=: an empty folder name"),
        ({"load_fast": "exported"}, "need a fast mode"),
        ({"mode": "fast", "compile_mode": "fastest"}, "compile_mode=fastest: one of"),
        ({"mode": "fast", "compile_mode": "default", "load_fast": "exported"}, "give compile_mode or load_fast"),
        ({"device": "bogus"}, "device=bogus: not a torch device"),
        ({"device": "meta"}, "device=meta: not a device the models run on"),
        ({"cpus": "0"}, "cpus=0: must be above 0"),
        ({"cpus": "inf"}, "cpus=inf: expected a finite number"),
        ({"batch_wait_ms": "nan"}, "batch_wait_ms=nan: expected a finite number"),
        ({"connection_timeout": "0"}, "connection_timeout=0: must be above 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            build(arguments)


def built_deployment(monkeypatch, arguments: dict) -> dict:
    """What deploy.ray_serve_app.build(arguments) asks of Ray Serve: the deployment's options
    ("options") and the replicas' arguments ("arguments"), recorded in its place."""
    from deploy import ray_serve_app

    asked = {}

    class Recorder:  # SegmentEverything.options(...).bind(...)
        def options(self, **options):
            asked["options"] = options
            return self

        def bind(self, *arguments):
            asked["arguments"] = arguments
            return self

    monkeypatch.setattr(ray_serve_app, "SegmentEverything", Recorder())
    ray_serve_app.build(arguments)
    return asked


def test_ray_serve_arguments_reach_the_deployment_in_their_units(monkeypatch):
    """What `serve run ... key=value` asks for is what the replicas get: milliseconds as
    seconds, MB as bytes, autoscaling at 2 x batch_size requests a replica up to max_replicas,
    room for a whole batch of requests per replica; the smallest valid values are taken, and a
    compile mode alone (it needs a fast mode) or a batch of 0 refused."""
    pytest.importorskip("ray")
    from deploy.ray_serve_app import MAX_ONGOING_REQUESTS, build

    asked = built_deployment(monkeypatch, {"replicas": "auto", "batch_size": "3", "batch_wait_ms": "50",
                                           "embedding_cache_mb": "1", "connection_timeout": "7", "device": "cpu"})
    assert asked["arguments"][1:] == (3, 0.05, 2**20, 7.0, ())
    assert built_deployment(monkeypatch, {"cors_origin": "http://a:3000,*", "device": "cpu"})["arguments"][-1] == (
        "http://a:3000", "*")
    assert asked["options"]["autoscaling_config"] == dict(min_replicas=1, max_replicas=4, target_ongoing_requests=6,
                                                          downscale_delay_s=300)
    assert asked["options"]["max_ongoing_requests"] == MAX_ONGOING_REQUESTS
    large = built_deployment(monkeypatch, {"batch_size": str(MAX_ONGOING_REQUESTS + 8), "replicas": "2",
                                           "device": "cpu"})["options"]
    assert built_deployment(monkeypatch, {"replicas": "auto", "max_replicas": "1", "device": "cpu"})[
        "options"]["autoscaling_config"]["max_replicas"] == 1
    assert large["max_ongoing_requests"] == MAX_ONGOING_REQUESTS + 8 and large["num_replicas"] == 2
    assert built_deployment(monkeypatch, {"replicas": 2, "device": "cpu"})["options"]["num_replicas"] == 2  # YAML's
    assert built_deployment(monkeypatch, {"batch_size": "1", "device": "cpu"})["arguments"][1] == 1
    for arguments, message in [({"batch_size": "0"}, "batch_size=0: must be at least 1"),
                               ({"compile_mode": "default"}, "need a fast mode"),
                               ({"cors_origin": "http://a:3000/"}, "is not an origin")]:
        with pytest.raises(ValueError, match=message):
            build(arguments)


@pytest.fixture
def bare_ray_batching(monkeypatch):
    """serve.batch outside a running Ray Serve: its check against the replica's settings has
    nothing to read, and its queue (one per decorated method, bound to the event loop of its
    first call) is made anew for this test's event loop."""
    pytest.importorskip("ray")
    from ray.serve import batching
    from deploy.ray_serve_app import SegmentEverything

    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
    monkeypatch.setattr(SegmentEverything.func_or_class.segment.set_max_batch_size.__self__, "_queue", None)


def bare_replica(**attributes):
    """A Ray Serve replica without its set-up (no model loaded, no Ray Serve), holding these
    attributes: its request handling and batches called directly."""
    from deploy.ray_serve_app import SegmentEverything

    replica_class = SegmentEverything.func_or_class
    replica = replica_class.__new__(replica_class)
    vars(replica).update({"model_calls": 0, "idle_trim": None, "waiting": 0, "decodes_between_batches": False,
                          "cors_origins": (), "request_threads": None,  # None: the event loop's executor
                          **attributes})  # on_model_thread's, make_masks' and __call__'s
    return replica


def bare_replica_answer(replica, method: str, path: str, chunks=(b"",), headers=(), root_path: str = ""):
    """A request answered by a replica called bare (no Ray Serve, no HTTP): (status, headers,
    body). Its body arrives as `chunks`; None in them is a client that disconnects there, ...
    one that stops sending, and a number a pause of that many seconds."""
    import asyncio

    from starlette.requests import Request

    scope = {"type": "http", "method": method, "path": root_path + path, "root_path": root_path, "query_string": b"",
             "headers": [(name.lower().encode(), value.encode()) for name, value in headers]}
    messages = list(chunks)

    async def receive():
        chunk = messages.pop(0)
        if isinstance(chunk, float):
            await asyncio.sleep(chunk)
            chunk = messages.pop(0)
        if chunk is None:
            return {"type": "http.disconnect"}
        if chunk is ...:
            await asyncio.sleep(60)
        return {"type": "http.request", "body": chunk, "more_body": bool(messages)}

    response = asyncio.run(replica(Request(scope, receive)))
    return response.status_code, response.headers, response.body


def test_a_ray_serve_replica_answers_statuses_as_server_py():
    """A replica's own answers, called bare: /health counts the image requests waiting (and no
    longer those answered), the route prefix without its slash is a permanent redirect, another
    path a JSON 404; a body of exactly the upload limit is read, one byte more is a 413; a body
    that stops arriving, or trickles in, is the replica's connection timeout's 408, a client that leaves while it
    is sent or that Ray cancels a 499 (not a 500, a failure to log); an image that failed in its
    batch raises its own error to its request (not an answer of masks)."""
    import asyncio

    pytest.importorskip("ray")
    from ray.exceptions import TaskCancelledError

    replica = bare_replica(limits=Limits(), connection_timeout_s=0.2, waiting=0, info={"mode": "ao"})
    gate = asyncio.Event()

    async def segment(request):
        await gate.wait()
        return RuntimeError("out of memory")

    replica.segment = segment

    async def waiting_then_health():
        image = np.zeros((8, 8, 3), np.uint8)
        masks = [asyncio.create_task(replica.masks(image)) for _ in range(2)]
        await asyncio.sleep(0.05)
        status, _, body = await asyncio.to_thread(bare_replica_answer, replica, "GET", "/health")
        gate.set()
        failures = []
        for task in masks:
            try:
                failures.append(("answered", await task))
            except RuntimeError as error:
                failures.append(("raised", error))
        return status, json.loads(body), failures

    status, health, failures = asyncio.run(waiting_then_health())
    assert status == 200 and health == {"status": "ok", "queued": 2, "mode": "ao"}
    assert [how for how, _ in failures] == ["raised", "raised"]  # its error's answer, not an answer of masks
    assert json.loads(bare_replica_answer(replica, "GET", "/health")[2])["queued"] == 0

    status, headers, _ = bare_replica_answer(replica, "GET", "", root_path="/sam2")
    assert status == 301 and headers["location"] == "/sam2/"
    status, _, body = bare_replica_answer(replica, "POST", "/uploads")  # its endpoints named, with their methods
    error = json.loads(body)["error"]
    assert status == 404 and error.startswith("not found: POST ") and "/metrics" not in error  # (not one of Ray's)
    assert all(re.search(rf"{method} [^;]*{re.escape(path)}(?![\w/])", error) for path, method in
               [("/upload", "POST"), ("/upload_rle", "POST"), ("/embed", "POST"), ("/segment", "POST"),
                ("/health", "GET"), ("/", "GET")])

    limit = 64
    replica.limits = Limits(max_upload_bytes=limit)
    answers = []

    async def uploaded_image(request, form=None):
        answers.append(len(await request.body()))
        raise TaskCancelledError()  # as Ray raises it for a request whose client left

    replica.uploaded_image = uploaded_image
    status, _, body = bare_replica_answer(replica, "POST", "/upload_rle", [b"x" * 40, b"x" * 24])
    assert answers == [limit] and status == 499, body
    status, _, body = bare_replica_answer(replica, "POST", "/upload_rle", [b"x" * 40, b"x" * 25])
    assert status == 413 and answers == [limit]
    started = time.monotonic()
    # (60 bytes: the least rate's deadline 120 ms after the stall's, whatever the machine's load)
    status, _, body = bare_replica_answer(replica, "POST", "/upload_rle", [b"x" * 60, ...])
    assert time.monotonic() - started < 10  # the replica's timeout, not the default's minute
    assert status == 408 and json.loads(body) == {"error": "request timeout: nothing received for 0.2 s"}
    # A byte every 0.1 s: never a pause of the timeout, yet far below 500 bytes/s (sixteen such
    # clients held every request a replica takes at once)
    status, _, body = bare_replica_answer(replica, "POST", "/upload_rle", [b"x", 0.1] * 8 + [b"x"])
    assert status == 408, body
    assert re.fullmatch(r"request timeout: its request arriving slower than 500 bytes/s \([1-9] bytes\)",
                        json.loads(body)["error"]), body
    status, _, body = bare_replica_answer(replica, "POST", "/upload_rle", [b"x" * 10, None])
    assert status == 499 and "before its request was read" in json.loads(body)["error"]
    assert answers == [limit]


def test_a_ray_serve_replica_lets_the_pages_server_py_lets_read_its_answers():
    """cors_origin=, as server.py's --cors-origin: the same CORS headers for a page of an origin given
    and of another, on an answer and on a preflight (OPTIONS, which a replica answers as Flask)."""
    pytest.importorskip("ray")

    tool = "http://localhost:3000"
    replica = bare_replica(limits=Limits(), info={"mode": "ao"}, cors_origins=(tool,))
    flask = create_app(InferenceWorker(), cors_origins=(tool,)).test_client()
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}

    def cors(headers) -> dict[str, str]:
        return {name.lower(): value for name, value in headers.items()
                if name.lower().startswith("access-control-") or name.lower() == "vary"}

    for method, path, headers in [("GET", "/health", {"Origin": tool}),
                                  ("OPTIONS", "/segment", {"Origin": tool, **preflight}),
                                  ("OPTIONS", "/upload_rle", {"Origin": "http://elsewhere", **preflight}),
                                  ("GET", "/health", {"Origin": "http://elsewhere"}), ("GET", "/health", {})]:
        status, ray_headers, _ = bare_replica_answer(replica, method, path, headers=headers.items())
        answer = flask.open(path, method=method, headers=headers)
        ours = cors(ray_headers)
        assert ours == cors(answer.headers), (method, path, headers)
        if method == "OPTIONS":  # and the methods Allow names (Flask's in any order)
            assert status == answer.status_code == 200
            assert set(ray_headers["allow"].split(", ")) == set(answer.headers["Allow"].split(", ")) == {
                "POST", "OPTIONS"}
    assert ours == {"vary": "Origin"}  # (a request with no Origin: no page's)


def test_a_ray_serve_replica_reads_a_segments_content_type_as_server_py():
    """/segment's Content-Type parsed as werkzeug parses it for server.py: one that ends in a vertical
    tab is no JSON for either (the replica's str.strip() took it as JSON, and looked up the id); a
    form under another type is told so."""
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from .test_http_front import multipart
    from .test_worker import StubGenerator

    from sam2serve.interactive import EmbeddingCache

    replica = bare_replica(limits=Limits(), info={"mode": "ao"}, segmenter=object(), connection_timeout_s=5,
                           cache=EmbeddingCache(2**20), pipeline=SimpleNamespace(mode=SimpleNamespace(name="ao")))
    worker = InferenceWorker()
    worker.start(StubGenerator(), segmenter=object())
    flask = create_app(worker, info={"mode": "ao"}).test_client()
    body = json.dumps({"image_id": "abc", "prompts": [{"points": [[1, 1]]}]}).encode()
    for content_type in ("application/json\x0b", "application/json ; charset=utf-8", "Application/JSON"):
        status, _, answer = bare_replica_answer(replica, "POST", "/segment", [body], [("content-type", content_type)])
        theirs = flask.post("/segment", data=body, headers={"Content-Type": content_type})
        assert (status, answer) == (theirs.status_code, theirs.get_data()), content_type
        assert status == (400 if content_type.endswith("\x0b") else 404), answer  # (404: an id not cached)
    # A form sent under another type (text, URL-encoded): told so, in both fronts' words; a body that is none, not.
    form = multipart([("image", "a.png", b"\x89PNG"), ("prompts", None, b"[]")])[0]
    urlencoded = "application/x-www-form-urlencoded"
    for content_type, data, words in [("text/plain", form, b"send the form as such"),
                                      (urlencoded, form, b"send the form as such"),
                                      (urlencoded, b"prompts=[]", b"/segment takes a JSON body")]:
        status, _, answer = bare_replica_answer(replica, "POST", "/segment", [data], [("content-type", content_type)])
        theirs = flask.post("/segment", data=data, headers={"Content-Type": content_type})
        assert (status, answer) == (400, theirs.get_data()) and words in answer, content_type


def test_a_ray_serve_replica_refuses_what_server_py_s_http_server_refuses(flask_client, monkeypatch):
    """Called bare: headers over 64 kB are server.py's 431 (Ray's proxy sets no limit: 100 MB of
    them were read); a photo posted as the body (curl --data-binary: URL-encoded, each '&' a part
    for Starlette) server.py's 400, not a 413 "more than 1000 parts"; more than a text field's
    limit after a form's last line its 413 (Ray took it); /static/index.html is sent to the page;
    an upload over the limit ends its connection."""
    pytest.importorskip("ray")
    from .test_http_front import multipart

    from werkzeug.formparser import FormDataParser

    from deploy import ray_serve_app
    from deploy.ray_serve_app import after_last_line

    replica = bare_replica(limits=Limits(), connection_timeout_s=5, waiting=0, info={})
    status, _, body = bare_replica_answer(replica, "GET", "/health", headers=[("X-Pad", "a" * 70_000)])
    assert (status, body.decode()) == (431, error_answer(HeadersTooLarge(65536))[1])
    # Before the URL's limit and the body's, as server.py's HTTP server reads the headers first.
    status, _, body = bare_replica_answer(replica, "POST", "/" + "a" * 9000, headers=[
        ("X-Pad", "a" * 70_000), ("Content-Length", str(60 << 20))])
    assert status == 431
    assert bare_replica_answer(replica, "GET", "/health", headers=[("X-Pad", "a" * 60_000)])[0] == 200
    photo = np.random.default_rng(0).integers(0, 256, 600_000, dtype=np.uint8).tobytes()  # about 2,300 '&'
    image = ("image", "a.jpg", (REPO / "examples" / "shapes.jpg").read_bytes())
    form = multipart([("image", "a.png", b"\x89PNG")])[0]  # (small: a URL-encoded body is read)
    for content_type in ("application/x-www-form-urlencoded", "application/json", "text/plain", "multipart/mixed"):
        status, _, answer = bare_replica_answer(replica, "POST", "/upload_rle", [form], headers=[
            ("Content-Type", content_type), ("Content-Length", str(len(form)))])
        flask = flask_client.post("/upload_rle", data=form, content_type=content_type)  # a form under another type
        assert (status, answer) == (400, flask.get_data()) and b"send the form as such" in answer, content_type
    # A URL-encoded body over a text field's limit is no form, refused unread (a 10 MB one held
    # a thread for 8 s in server.py, Ray's event loop 10 s): werkzeug's parser is not called.
    monkeypatch.setattr(FormDataParser, "_parse_urlencoded", lambda *arguments: pytest.fail("parsed"))
    monkeypatch.setattr(ray_serve_app, "parse_qsl", lambda *arguments, **options: pytest.fail("parsed"))
    for body, content_type in [(photo, "application/x-www-form-urlencoded"),
                               (photo, "Application/X-WWW-Form-Urlencoded"),  # a media type's case is no matter
                               (b"image=" + b"a" * 600_000, "application/x-www-form-urlencoded"),
                               (multipart([image])[0] + b"x" * 600_000, multipart([image])[1]),
                               (multipart([image])[0] + b"x" * 600_000, "Multipart/Form-Data; boundary=b")]:
        status, _, answer = bare_replica_answer(replica, "POST", "/upload_rle", [body],
                                                headers=[("Content-Type", content_type),
                                                         ("Content-Length", str(len(body)))])
        flask = flask_client.post("/upload_rle", data=body, content_type=content_type)
        assert (status, answer) == (flask.status_code, flask.get_data()) and status in (400, 413), answer[:200]
    assert after_last_line(b"--b--\r\n" + b"x" * 10, "b") == 10 == after_last_line(b"x\r\n--b--" + b"x" * 10, "b")
    for path, location in [("/static/index.html", "../"), ("/static/index.html/", "../../")]:
        status, headers, _ = bare_replica_answer(replica, "GET", path)
        assert (status, headers["location"]) == (308, location) == (flask_client.get(path).status_code, location)
        assert bare_replica_answer(replica, "POST", path)[0] == 405 == flask_client.post(path).status_code
    for path in ("/static/no_such_file.js", "/static/", "/static/a/b.css"):  # the page's files named, as server.py
        missing = flask_client.get(path)
        status, _, answer = bare_replica_answer(replica, "GET", path)
        assert (status, answer) == (404, missing.get_data()) and missing.status_code == 404
    allowed = lambda text: set(text.replace(" ", "").split(","))  # noqa: E731 - an Allow header's methods
    for method, path in [("GET", "/upload_rle"), ("PUT", "/segment"), ("POST", "/health"), ("POST", "/static/app.js")]:
        wrong = flask_client.open(path, method=method)  # a 405 says what the endpoint takes, in both fronts' words
        status, headers, answer = bare_replica_answer(replica, method, path)
        assert (status, answer) == (405, wrong.get_data()) and wrong.status_code == 405
        assert allowed(headers["allow"]) == allowed(wrong.headers["Allow"]), path
        options = bare_replica_answer(replica, "OPTIONS", path)[1]["allow"]
        assert allowed(options) == allowed(flask_client.options(path).headers["Allow"]), path
    for path in ("/health", "/static/app.js", "/"):  # HEAD where GET is taken: answered as GET (headers alone sent)
        status, headers, _ = bare_replica_answer(replica, "HEAD", path)
        head = flask_client.head(path)
        assert (status, headers["content-type"].split(";")[0]) == (200, head.mimetype) and head.status_code == 200
    status, headers, _ = bare_replica_answer(replica, "POST", "/upload_rle",
                                             headers=[("Content-Length", str(60 << 20))])
    assert status == 413 and headers["connection"] == "close"
    replica.connection_timeout_s = 0.2  # a body that stops arriving: server.py's 408 closes it too
    status, headers, _ = bare_replica_answer(replica, "POST", "/upload_rle", [b"x" * 60, ...])
    assert status == 408 and headers["connection"] == "close"


def test_a_ray_serve_batch_that_fails_runs_again_image_by_image(monkeypatch):
    """As server.py's worker does: a batch that fails (a bad image, a GPU out of memory) fails
    only the requests whose image fails alone."""
    import asyncio
    from sam2serve.worker import ModelThread

    pytest.importorskip("ray")
    from deploy.ray_serve_app import ImageRequest

    # Called bare: its batching needs a running Ray Serve.
    replica = bare_replica(model_thread=ModelThread(),
                           pipeline=load_pipeline(None, None, "ao", device="cpu", amg={"points_per_side": 4}))
    generate_batch = replica.pipeline.generator.generate_batch

    def fails_on_more_than_one_or_on_white(images):
        if len(images) > 1 or images[0].min() == 255:
            raise RuntimeError("out of memory")
        return generate_batch(images)

    monkeypatch.setattr(replica.pipeline.generator, "generate_batch", fails_on_more_than_one_or_on_white)
    images = [np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8)]
    answers = asyncio.run(type(replica).segment.__wrapped__(replica, [ImageRequest(image) for image in images]))
    assert answers[0] == generate_batch(images[:1])[0] and isinstance(answers[1], RuntimeError)
    replica.model_thread.shutdown()


def test_a_ray_serve_batch_runs_each_request_under_its_own_settings(monkeypatch):
    """Requests with thresholds of their own (?box_nms_thresh=...) in one replica batch each get
    the masks of their settings, as in server.py, in one call of the model per settings; the
    others the replica's."""
    import asyncio
    from sam2serve.worker import ModelThread

    pytest.importorskip("ray")
    from deploy import ray_serve_app
    from deploy.ray_serve_app import ImageRequest
    from sam2serve.amg import with_settings

    calls, generate_each_image = [], ray_serve_app.generate_each

    def generate_each(generator, images, annotate, stop, settings):
        calls.append((len(images), settings))
        return generate_each_image(generator, images, annotate, stop, settings)

    monkeypatch.setattr(ray_serve_app, "generate_each", generate_each)

    # Called bare: its batching needs a running Ray Serve.
    replica = bare_replica(model_thread=ModelThread(),
                           pipeline=load_pipeline(None, None, "ao", device="cpu", amg={"points_per_side": 4}))
    image = make_scene(64, 80, seed=5)
    loose = {"box_nms_thresh": 1.0, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    requests = [ImageRequest(image), ImageRequest(image, tuple(sorted(loose.items()))), ImageRequest(image)]
    answers = asyncio.run(type(replica).segment.__wrapped__(replica, requests))
    generator = replica.pipeline.generator
    assert answers[0] == answers[2] == generator.generate(image)
    assert answers[1] == with_settings(generator, loose).generate(image) and len(answers[1]) > len(answers[0])
    assert calls == [(2, {}), (1, loose)]
    replica.model_thread.shutdown()


def test_a_ray_serve_batch_stops_only_once_every_request_of_it_is_cancelled(monkeypatch):
    """One client of a batch leaving does not stop the masks the others wait for."""
    import asyncio
    from types import SimpleNamespace

    from sam2serve.worker import ModelThread

    pytest.importorskip("ray")
    from deploy import ray_serve_app
    from deploy.ray_serve_app import ImageRequest

    monkeypatch.setattr(ray_serve_app, "generate_each", lambda generator, images, annotate, stop, settings:
                        [stop() for _ in images])
    replica = bare_replica(model_thread=ModelThread(), pipeline=SimpleNamespace(generator=None))
    image = np.zeros((8, 8, 3), np.uint8)
    try:
        for cancelled, stopped in [((True, False), False), ((True, True), True)]:
            requests = [ImageRequest(image, cancelled=one) for one in cancelled]
            assert asyncio.run(type(replica).segment.__wrapped__(replica, requests)) == [stopped, stopped]
    finally:
        replica.model_thread.shutdown()


def test_a_ray_serve_request_whose_client_left_is_not_run(bare_ray_batching):
    """As server.py skips a request whose client has gone: Ray Serve cancels the request of a
    client that disconnects, and a cancelled caller is dropped from its batch, and a cancelled
    model-thread call from the thread's queue, before the model runs them."""
    import asyncio
    import threading
    from types import SimpleNamespace

    from sam2serve.worker import ModelThread

    pytest.importorskip("ray")

    seen, gate = [], threading.Event()

    class Generator:
        def generate_batch(self, images):
            seen.append([int(image[0, 0, 0]) for image in images])
            gate.wait(timeout=10)
            return [[] for _ in images]

    replica = bare_replica(model_thread=ModelThread(), pipeline=SimpleNamespace(generator=Generator()), waiting=0)
    replica.segment.set_max_batch_size(1)
    replica.segment.set_batch_wait_timeout_s(0)

    async def clients():
        image = lambda value: np.full((8, 8, 3), value, np.uint8)  # noqa: E731
        first = asyncio.create_task(replica.masks(image(1)))
        while not seen:  # the model runs image 1 and is held there
            await asyncio.sleep(0.01)
        left, stays = asyncio.create_task(replica.masks(image(2))), asyncio.create_task(replica.masks(image(3)))
        coco = asyncio.create_task(replica.on_model_thread(lambda: seen.append("coco")))
        await asyncio.sleep(0.1)
        left.cancel()  # as Ray Serve does when their clients disconnect
        coco.cancel()
        await asyncio.sleep(0.1)  # the cancellations take effect on the event loop's next turns
        gate.set()
        await first
        await stays
        await asyncio.sleep(0.1)

    asyncio.run(clients())
    replica.model_thread.shutdown()
    assert seen == [[1], [3]]


def test_a_ray_serve_request_cancelled_while_its_masks_are_made_stops_them(bare_ray_batching):
    """As server.py: once its client disconnects (Ray cancels the request), segment-everything
    under way stops before its next batch of point prompts, and the next request is served."""
    import asyncio
    from types import SimpleNamespace

    from sam2serve.worker import ModelThread

    pytest.importorskip("ray")

    from .test_worker import StoppableStub

    stub = StoppableStub()
    stub.gate.clear()
    replica = bare_replica(model_thread=ModelThread(), pipeline=SimpleNamespace(generator=stub), waiting=0)
    replica.segment.set_max_batch_size(1)
    replica.segment.set_batch_wait_timeout_s(0)

    async def clients():
        image = lambda value: np.full((8, 8, 3), value, np.uint8)  # noqa: E731
        for value, annotate in ((1, False), (2, True)):  # masks, then records (?format=coco)
            left = asyncio.create_task(replica.masks(image(value), annotate))
            while len(stub.stopped) < value:  # its masks are being made, and held there
                if stub.running.is_set():
                    left.cancel()  # as Ray Serve does when its client disconnects
                await asyncio.sleep(0.01)
            stub.running.clear()
        stub.gate.set()
        return await replica.masks(image(3))

    answer = asyncio.run(asyncio.wait_for(clients(), timeout=30))
    replica.model_thread.shutdown()
    assert stub.stopped == [[1], [2]] and stub.batches == [[3]] and answer == [{"size": [8, 8], "counts": [3, 1]}]


@pytest.mark.parametrize("between_batches", [True, False])
def test_a_ray_serve_replicas_clicks_go_ahead_of_its_images(bare_ray_batching, between_batches):
    """As server.py's worker: a /segment's prompt sets go ahead of the images queued on the model's
    thread before them (?format=coco's records; @serve.batch hands it one batch at a time), and on
    a CPU are decoded between the batches of point prompts of the images being made."""
    import asyncio
    from types import SimpleNamespace

    from sam2serve.worker import ModelThread

    pytest.importorskip("ray")

    from .test_worker import StoppableStub

    stub = StoppableStub()  # asks should_stop every 10 ms while its gate is closed, as between batches
    stub.gate.clear()
    replica = bare_replica(model_thread=ModelThread(), pipeline=SimpleNamespace(generator=stub),
                           decodes_between_batches=between_batches)
    replica.segment.set_max_batch_size(1)
    replica.segment.set_batch_wait_timeout_s(0)

    async def clients():
        image = lambda value: np.full((8, 8, 3), value, np.uint8)  # noqa: E731
        masks = asyncio.create_task(replica.masks(image(1)))
        while not stub.running.is_set():
            await asyncio.sleep(0.01)
        records = asyncio.create_task(replica.masks(image(2), annotate=True))
        await asyncio.sleep(0.1)  # queued on the model's thread
        click = asyncio.create_task(replica.on_model_thread(lambda: [*stub.batches], kind="decode"))
        await asyncio.wait([click], timeout=2)
        answered_while_held = click.done()
        stub.gate.set()
        return answered_while_held, await click, await masks, await records

    held, seen, masks, records = asyncio.run(asyncio.wait_for(clients(), timeout=30))
    replica.model_thread.shutdown()
    assert held == between_batches
    assert seen == ([] if between_batches else [[1]])  # before image 1's end, or before image 2's records
    assert stub.batches == [[1], [-2]] and masks == [{"size": [8, 8], "counts": [1, 1]}] and len(records) == 1


def test_a_ray_serve_replica_queues_each_part_of_prompt_sets_as_a_decode_of_its_own(monkeypatch):
    """As server.py's turns on the model: each part of a /segment's prompt sets (SEGMENT_PART_PIXELS)
    is a "decode" of its own on the model's thread, queued once the one before it is decoded, so that
    between an image batch's batches of points its parts are decoded one a turn. All of them ran in one
    gap between two batches (64 sets on a 12 MP image: 38 s), and then none of more than one part did."""
    from types import SimpleNamespace

    pytest.importorskip("ray")
    import deploy.ray_serve_app as ray_serve_app
    from sam2serve.interactive import EmbeddingCache
    from sam2serve.worker import ModelThread

    calls, decoded = [], []  # each model call's kind and the prompt sets decoded by it
    segmenter = SimpleNamespace(segment=lambda embedding, part, mask_inputs: decoded.append(len(part)) or [
        SimpleNamespace(masks=torch.zeros(1, 2, 2, dtype=torch.bool), iou_predictions=torch.ones(1),
                        low_res_logits=[]) for _ in part])
    replica = bare_replica(limits=Limits(), info={"mode": "ao"}, segmenter=segmenter, connection_timeout_s=5,
                           cache=EmbeddingCache(2**20), pipeline=SimpleNamespace(mode=SimpleNamespace(name="ao")),
                           model_thread=ModelThread())
    model_call = replica.on_model_thread
    monkeypatch.setattr(replica, "on_model_thread", lambda *call, kind="call": calls.append(kind) or model_call(
        *call, kind=kind), raising=False)
    for sets, parts in ((1, [1]), (33, [33]), (34, [33, 1]), (67, [33, 33, 1])):  # 3 masks of 1000 x 1000: 33 a part
        calls.clear(), decoded.clear()
        prompts = [SimpleNamespace(multimask=True, keep_logits=False)] * sets
        monkeypatch.setattr(ray_serve_app, "cached_image_prompts", lambda body, cache, limits, prompts=prompts: (
            "id", SimpleNamespace(size=(1000, 1000)), prompts, {}))
        status, _, body = bare_replica_answer(replica, "POST", "/segment", [b"{}"],
                                              [("content-type", "application/json")])
        assert status == 200 and len(json.loads(body)["results"]) == sets
        assert (calls, decoded) == (["decode"] * len(parts), parts), sets
    replica.model_thread.shutdown()


def test_a_ray_serve_replica_stops_a_segment_whose_client_left_before_its_next_part():
    """As server.py: a /segment whose request Ray cancels (its client gone) runs none of its parts
    on the model's thread from their turn on, the one queued then included; the replica decoded
    them all for nobody."""
    import asyncio
    import threading
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from sam2serve.interactive import EmbeddingCache
    from sam2serve.protocol import segment_answer
    from sam2serve.worker import ModelThread

    decoding, gate, decoded = threading.Event(), threading.Event(), []

    def segment(embedding, part, mask_inputs):
        decoding.set()
        gate.wait(10)
        decoded.append(len(part))
        return [SimpleNamespace(masks=torch.zeros(1, 2, 2, dtype=torch.bool), iou_predictions=torch.ones(1),
                                low_res_logits=[]) for _ in part]

    replica = bare_replica(model_thread=ModelThread())
    prompts = [SimpleNamespace(multimask=True, keep_logits=False)] * 34  # 3 masks of 1000 x 1000: parts of 33 and 1

    async def client(while_queued: bool):
        model_held = asyncio.ensure_future(replica.on_model_thread(gate.wait, 10)) if while_queued else None
        request = asyncio.ensure_future(replica.off_the_model_thread(
            segment_answer, "id", SimpleNamespace(size=(1000, 1000)), prompts, {}, SimpleNamespace(segment=segment),
            EmbeddingCache(2**20)))
        while not (replica.model_thread.jobs.qsize() if while_queued else decoding.is_set()):
            await asyncio.sleep(0.01)  # its first part queued behind the model's work, or on the model
        request.cancel()  # as Ray cancels the request of a client gone
        await asyncio.sleep(0.05)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.5)  # time for a part to be queued and decoded
        if model_held is not None:
            await model_held

    asyncio.run(asyncio.wait_for(client(while_queued=False), timeout=30))
    assert decoded == [33]
    decoded.clear(), gate.clear()
    asyncio.run(asyncio.wait_for(client(while_queued=True), timeout=30))  # cancelled before its first part's turn
    replica.model_thread.shutdown()
    assert decoded == []


def test_a_ray_serve_replica_takes_a_chunked_image_body_without_a_type():
    """requests.post(url, data=a_generator) sends the image chunked, with no Content-Length and no
    Content-Type: waitress gives server.py the length it read, and the replica counts the body it
    read too (it took the length declared, none, and answered 400 "no image")."""
    import asyncio

    from starlette.requests import Request

    from deploy.ray_serve_app import with_body_read
    from sam2serve.preprocess import decode_image

    png = io.BytesIO()
    Image.fromarray(make_scene(20, 30, seed=1)).save(png, format="PNG")
    data = png.getvalue()
    chunks = [data[:100], data[100:]]
    scope = {"type": "http", "method": "POST", "path": "/upload_rle", "root_path": "", "query_string": b"",
             "headers": [(b"transfer-encoding", b"chunked")]}

    async def receive():
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def image_read():
        request = await with_body_read(Request(scope, receive), Limits(), 5)
        return await bare_replica(limits=Limits()).uploaded_image(request)

    np.testing.assert_array_equal(asyncio.run(image_read()), decode_image(data, Limits().max_pixels))


def test_a_ray_serve_replica_answers_an_embed_of_an_encoded_image_while_its_model_is_busy():
    """As server.py: the image's id and the cache's look-up off the model's thread, only an encoding
    on it. The web page's /embed after its masks (the encoding kept) waited for the image batch being
    made: 7 s on the micro model, 4 images a batch, on 2 cores."""
    import asyncio
    import threading
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from sam2serve.interactive import EmbeddingCache
    from sam2serve.protocol import embed_image, image_key
    from sam2serve.worker import ModelThread

    cache, encoded = EmbeddingCache(2**20), SimpleNamespace(nbytes=10, size=(8, 8))
    cache.put(image_key("encoded"), encoded, 10)
    segmenter = SimpleNamespace(image_id=lambda image: "encoded" if image[0, 0, 0] == 1 else "new",
                                embed=lambda image: SimpleNamespace(nbytes=10, size=(8, 8)))
    replica = bare_replica(model_thread=ModelThread(), cache=cache, segmenter=segmenter)
    gate, running = threading.Event(), threading.Event()

    async def clients():
        busy = asyncio.ensure_future(replica.on_model_thread(lambda: running.set() or gate.wait(10), kind="image"))
        while not running.is_set():  # images being made, held there
            await asyncio.sleep(0.01)
        image = lambda value: np.full((8, 8, 3), value, np.uint8)  # noqa: E731
        cached = await asyncio.wait_for(replica.off_the_model_thread(embed_image, image(1), segmenter, cache), 5)
        new = asyncio.ensure_future(replica.off_the_model_thread(embed_image, image(2), segmenter, cache))
        await asyncio.sleep(0.3)
        waited = not new.done()  # an encoding waits for its turn on the model
        gate.set()
        return cached, waited, await new, await busy

    cached, waited, new, _ = asyncio.run(asyncio.wait_for(clients(), timeout=30))
    replica.model_thread.shutdown()
    assert cached == ("encoded", encoded) and waited and new[0] == "new" and cache.holds(image_key("new"))


def test_a_ray_serve_replica_keeps_segment_everythings_encodings_for_embed(bare_ray_batching):
    """As server.py does: an /embed of an image whose masks a replica has just made finds that
    image's encoding in the replica's cache instead of encoding it again, at once while every other
    request the replica holds waits for its model (it waited behind six on the event loop's
    executor, whose threads those held)."""
    import asyncio
    import threading

    pytest.importorskip("ray")
    from deploy.ray_serve_app import MAX_ONGOING_REQUESTS, SegmentEverything
    from sam2serve.protocol import embed_image

    options = dict(checkpoint_dir=None, model_type=None, mode="ao", device="cpu", amg={"points_per_side": 4},
                   load_fast=None, compile_mode=None)
    replica = SegmentEverything.func_or_class(options, 1, 0.0)  # a replica's set-up, without Ray Serve
    image = make_scene(96, 128, seed=3)
    asyncio.run(replica.masks(image))
    assert replica.cache.stats().spares == 1
    model_held = threading.Event()

    async def embed_while_clicks_wait():
        busy = asyncio.ensure_future(replica.on_model_thread(model_held.wait, 30))
        clicks = [asyncio.ensure_future(replica.off_the_model_thread(lambda run: run(lambda: None, kind="decode")))
                  for _ in range(MAX_ONGOING_REQUESTS - 1)]
        await asyncio.sleep(0.2)  # each on a thread of its own, waiting for the model
        try:
            return await asyncio.wait_for(
                replica.off_the_model_thread(embed_image, image, replica.segmenter, replica.cache), timeout=10)
        finally:
            model_held.set()
            await asyncio.gather(busy, *clicks)

    asyncio.run(embed_while_clicks_wait())
    stats = replica.cache.stats()
    replica.model_thread.shutdown()
    replica.request_threads.shutdown()
    assert (stats.hits, stats.misses, stats.entries, stats.spares) == (1, 0, 1, 0)
    assert replica.decodes_between_batches  # on a CPU, as server.py's worker


def test_a_ray_serve_replica_idle_after_work_gives_freed_memory_back_once(monkeypatch):
    """As server.py's worker does: a burst of large images left a replica's freed memory held
    for good. Once its model thread is idle TRIM_AFTER_IDLE_S after work, the memory is given
    back, once, on that thread; work meanwhile puts it off. Idle from the end of the thread's
    work: a call whose request was cancelled runs on (its idle time counted from the
    cancellation, the trim ran as the call ended, ahead of the next request)."""
    import asyncio
    import threading
    from sam2serve.worker import ModelThread

    pytest.importorskip("ray")
    from sam2serve import worker as worker_module

    asked = []  # (the workers of earlier tests still serve: this replica's thread alone is counted)
    monkeypatch.setattr("deploy.ray_serve_app.TRIM_AFTER_IDLE_S", 0.5)
    monkeypatch.setattr(worker_module, "return_freed_memory", lambda above: threading.current_thread().name.startswith(
        "idle-trim-test") and asked.append(above) or 0)
    replica = bare_replica(model_thread=ModelThread("idle-trim-test"))

    async def work():
        await asyncio.gather(replica.on_model_thread(time.sleep, 0.7), replica.on_model_thread(time.sleep, 0.1))
        await asyncio.sleep(0.15)
        await replica.on_model_thread(time.sleep, 0.2)  # within the idle time: the trim put off
        assert asked == []  # not while calls waited, nor between them
        cancelled = asyncio.ensure_future(replica.on_model_thread(time.sleep, 0.9))
        await asyncio.sleep(0.05)
        cancelled.cancel()  # its client gone: the call runs on
        await asyncio.sleep(1.0)  # 0.15 s after the call ended
        assert asked == []
        await replica.on_model_thread(time.sleep, 0.05)
        await asyncio.sleep(1.0)

    asyncio.run(work())
    replica.model_thread.shutdown()
    assert asked == [worker_module.TRIM_ABOVE_BYTES]


@counts_native_threads
def test_a_ray_serve_replica_builds_its_model_and_prompts_on_one_thread():
    """A replica's pipeline and its prompts' segmenter are both built on its model thread
    (worker.py, "Which thread"): the segmenter built on the replica's own thread gave the
    process a second OpenMP pool, and on 2 cores the micro model's images took 1.9 s instead
    of 1.2. With torch on 2 threads, a replica adds one thread that Python did not start (its
    model thread's pool's), not two."""
    pytest.importorskip("ray")
    assert native_threads_added("from deploy.ray_serve_app import SegmentEverything",
                                "SegmentEverything.func_or_class({}, 2, 0.02)") == 1


@counts_native_threads
def test_a_ray_data_bulk_worker_loads_and_runs_its_model_on_one_thread():
    """Ray Data builds a worker on the actor's main thread and runs its batches on a thread of
    its own: both on the worker's model thread, one OpenMP pool (two pools: with 2 threads a
    worker, the default model's images took 1.4 to 1.9 s instead of 0.75 to 1.07, docs/performance.md)."""
    pytest.importorskip("ray")
    assert native_threads_added("""
import numpy as np
from concurrent.futures import ThreadPoolExecutor
from deploy.ray_bulk_job import Segmenter
""", """
worker = Segmenter(dict(mode="ao", device="cpu", batch_size=1, amg={"points_per_side": 4}))
batches = ThreadPoolExecutor(1)  # Ray Data's thread for batches, alive as the threads are counted
line, = batches.submit(worker, {"path": np.array(["examples/shapes.jpg"])}).result()["line"]
assert line.startswith('{"mask_0":{"size":[240,320]'), line[:200]
""") == 1


def test_a_ray_data_bulk_worker_whose_model_does_not_load_answers_every_image_with_why(tmp_path, capsys):
    """Kernels exported for something else (or a checkpoint missing on a node): the worker
    answers each image with the refusal in one line, as a Modal container does, and the job's
    summary shows it; a worker that died instead would reach the driver as Ray's ActorDiedError,
    whose text does not say why."""
    pytest.importorskip("ray")
    from deploy.ray_bulk_job import Segmenter
    from sam2serve.cli import report_error_lines

    kernels = tmp_path / "exported"
    kernels.mkdir()
    (kernels / "manifest.json").write_text(json.dumps(
        {"checkpoint": "sam2.1_hiera_tiny.pt#0", "image_size": 1024, "dtype": "float32", "points_per_batch": 8,
         "batch_size": 2, "multimask_output": True, "device": "cpu", "gpu_architecture": "", "cpu_target": "native",
         "cpu_instruction_sets": "", "torch_version": torch.__version__, "files": {}}))
    worker = Segmenter(dict(mode="fast", device="cpu", batch_size=2, amg={"points_per_batch": 8},
                            load_fast=str(kernels)))
    paths = [str(REPO / "examples" / "shapes.jpg"), str(tmp_path / "missing.jpg"), str(REPO / "README.md")]
    lines = worker({"path": np.array(paths)})["line"]
    assert len(lines) == 3 and len(set(lines)) == 1
    error = json.loads(lines[0])["error"]
    assert error.startswith(f"the worker could not load its model: PackageMismatch: the exported kernels in "
                            f"{kernels} were built for something else: checkpoint: package 'sam2.1_hiera_tiny.pt#0', "
                            "server "), error
    assert "; image_size: package 1024, server 256; " in error and error.endswith("; export them again for this "
                                                                                  "server with --save-fast")
    capsys.readouterr()  # the worker's log
    with pytest.raises(SystemExit):
        report_error_lines(paths, [(path, error) for path in paths], tmp_path / "rle_masks")
    assert f"3 of 3 images answered an error line, e.g. {paths[0]} ({error}), {paths[1]}, {paths[2]}\n" in (
        capsys.readouterr().err)


def test_ray_data_bulk_job_writes_the_servers_lines_in_order(local_ray, tiny_checkpoint_dir, image_files,
                                                               flask_client, tmp_path):
    from deploy.ray_bulk_job import run

    huge = tmp_path / "huge.jpg"  # sparse: 1 TiB that costs no disk, refused as the server's 413, not read
    with open(huge, "wb") as file:
        file.write((image_files / "a.jpg").read_bytes())
        file.truncate(2**40)
    paths = [str(path) for path in sorted(image_files.iterdir())] * 2 + [str(tmp_path / "missing.jpg"), str(huge)]
    np.random.default_rng(0).shuffle(paths)
    options = dict(checkpoint_dir=str(tiny_checkpoint_dir), model_type="tiny", mode="ao", device="cpu",
                   amg=KEEP_EVERY_CANDIDATE)
    output = tmp_path / "rle_masks"
    failed = run(paths, output, options, workers=1, batch_size=3)
    assert [path for path, _ in failed] == [
        path for path in paths if Path(path).name in ("missing.jpg", "not_an_image.jpg", "huge.jpg")]
    assert sorted(file.name for file in tmp_path.iterdir()) == ["huge.jpg", "rle_masks"]  # no .partial left
    lines = output.read_text().splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        if path.endswith("missing.jpg"):
            assert json.loads(line) == {"error": "the image file could not be read"}
            continue
        if path == str(huge):
            assert json.loads(line) == {"error": "upload larger than the limit of 52428800 bytes"}
            continue
        assert line.encode() == flask_answer(flask_client, "/upload_rle", Path(path).read_bytes())[1], path


def test_the_bulk_job_stops_on_sigterm_in_one_line(tmp_path):
    """SIGTERM (a time limit, a scheduler) while the job runs: "stopped (SIGTERM)", status 143
    and no output, as every script of the project, where Ray's handler (put in place by
    ray.init) aborted it with a stack dump. A Ray instance of its own, on the default model."""
    paths = tmp_path / "paths"
    paths.write_text(f"{REPO / 'examples' / 'shapes.jpg'}\n" * 40)
    output, log = tmp_path / "rle_masks", tmp_path / "log"
    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    with log.open("w") as stderr:
        job = subprocess.Popen([sys.executable, "-m", "deploy.ray_bulk_job", str(paths), str(output), "--mode", "ao"],
                               cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                               start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while "worker(s) on" not in log.read_text() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert job.poll() is None and "worker(s) on" in log.read_text(), log.read_text()
            job.send_signal(signal.SIGTERM)
            job.wait(timeout=120)
        finally:
            if job.poll() is None:  # the job and the Ray processes it started
                os.killpg(job.pid, signal.SIGKILL)
    text = log.read_text()
    assert job.returncode == -signal.SIGTERM and text.strip().splitlines()[-1] == "stopped (SIGTERM)", text[-3000:]
    assert "Traceback" not in text and "SIGTERM received" not in text, text[-3000:]
    assert not output.exists()


def test_the_bulk_job_run_by_its_path_from_elsewhere_gets_the_checkouts_code_in_its_workers(tmp_path):
    """`python deploy/ray_bulk_job.py` from another folder: its Ray workers (a local instance)
    found no sam2serve, and Ray retried their start forever."""
    paths = tmp_path / "paths"
    paths.write_text(f"{REPO / 'examples' / 'shapes.jpg'}\n")
    env = {name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "PYTHONPATH")}
    job = subprocess.run([sys.executable, str(REPO / "deploy" / "ray_bulk_job.py"), "paths", "out", "--points-per-side",
                          "4"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert job.returncode == 0 and "No module named" not in job.stderr, job.stderr[-3000:]
    assert job.stderr.strip().splitlines()[-1] == "wrote 1 line to out"
    assert json.loads((tmp_path / "out").read_text())["mask_0"]["size"] == [240, 320]


def test_the_bulk_job_stopped_while_ray_starts_says_so_in_one_line(tmp_path):
    """SIGTERM while ray.init runs, to the handler Ray has put in place by then (an exit with
    status 15 and no word): the job stops as every script does. Ray's start stood in for (the
    window lasts seconds), its handler as Ray's."""
    paths = tmp_path / "paths"
    paths.write_text(f"{REPO / 'examples' / 'shapes.jpg'}\n")
    script = f"""
import os, signal, sys
from deploy import ray_bulk_job
from sam2serve.cli import run_script

def starting(address=None):  # Ray's handler put in place, then a SIGTERM before ray.init returns
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(signal.SIGTERM))
    os.kill(os.getpid(), signal.SIGTERM)

ray_bulk_job.ray.init = starting
sys.argv = ["ray_bulk_job", {str(paths)!r}, {str(tmp_path / 'rle_masks')!r}, "--mode", "ao"]
run_script(ray_bulk_job.main)
"""
    stopped = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == -signal.SIGTERM, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == "stopped (SIGTERM)", stopped.stderr


def test_the_bulk_job_takes_the_underscore_spellings_as_its_other_options(tmp_path, monkeypatch):
    """--batch_size and --load_fast were refused where --points_per_side was taken."""
    from deploy import ray_bulk_job

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "paths").write_text("a.jpg\n")
    (tmp_path / "kernels").mkdir()
    args = ray_bulk_job.parse_args([str(tmp_path / "paths"), str(tmp_path / "out"), "--mode", "fast",
                                    "--batch_size", "2", "--load_fast", str(tmp_path / "kernels")])
    assert args.batch_size == 2 and args.options["load_fast"] == str(tmp_path / "kernels")


def test_the_bulk_jobs_defaults_and_a_kernels_folder_on_the_clusters_machines(tmp_path, monkeypatch, capsys):
    """By default one worker and batches of 4 images; with a cluster, --load-fast names a folder
    of the workers' machines, which need not exist on this one (without, it must)."""
    from deploy import ray_bulk_job

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "paths").write_text("a.jpg\n")
    arguments = [str(tmp_path / "paths"), str(tmp_path / "out")]
    args = ray_bulk_job.parse_args(arguments)
    assert (args.workers, args.batch_size, args.on_cluster) == (1, 4, False)
    kernels = str(tmp_path / "on_the_workers")
    args = ray_bulk_job.parse_args(arguments + ["--mode", "fast", "--load-fast", kernels, "--address", "10.0.0.1:6379"])
    assert args.on_cluster and args.options["load_fast"] == kernels
    with pytest.raises(SystemExit):
        ray_bulk_job.parse_args(arguments + ["--mode", "fast", "--load-fast", kernels])
    assert f"--load-fast '{kernels}': no such folder" in capsys.readouterr().err


def test_the_ray_workers_device_is_the_clusters(local_ray, tmp_path, monkeypatch, capsys):
    """Started on a machine without a GPU (a cluster's head node), the bulk job asks for the workers'
    GPUs: CUDA is checked on this machine only without a cluster, each worker sizes a fast mode's
    point batches itself, and with no --device the cluster's GPUs decide (the head's did)."""
    from deploy import ray_bulk_job

    paths = tmp_path / "paths"
    paths.write_text("a.jpg\n")
    arguments = [str(paths), str(tmp_path / "out"), "--mode", "fast", "--points-per-side", "8"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    on_cluster = ray_bulk_job.parse_args(arguments + ["--device", "cuda", "--address", "10.0.0.1:6379"])
    assert on_cluster.options["device"] == "cuda" and on_cluster.options["amg"]["points_per_side"] == 8
    assert "points_per_batch" not in on_cluster.options["amg"]  # the worker's GPU memory decides
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            ray_bulk_job.parse_args(arguments + ["--device", "cuda"])  # the workers are this machine's
        assert "--device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert ray_bulk_job.parse_args(arguments).options["device"] is None
    assert ray_bulk_job.cluster_device() == ("cuda" if local_ray.cluster_resources().get("GPU") else "cpu")
    monkeypatch.setattr(ray_bulk_job.ray, "cluster_resources", lambda: {"CPU": 64.0, "GPU": 8.0})
    assert ray_bulk_job.cluster_device() == "cuda"
    # Ray Serve's application built on the cluster, from a config file
    assert built_deployment(monkeypatch, {})["options"]["ray_actor_options"]["num_gpus"] == 1


def test_a_mask_generation_switch_given_as_text_reads_true_false_one_and_zero():
    """Ray Serve's key=value arguments: use_m2m=true, =1 (any case) switch it on, =false and =0
    off; other words are refused rather than read as off."""
    from sam2serve.cli import option_value

    assert [option_value("use_m2m", text) for text in ("true", "True", "1", "false", "FALSE", "0")] == [
        True, True, True, False, False, False]
    with pytest.raises(ValueError, match="use_m2m: expected true or false, got 'yes'"):
        option_value("use_m2m", "yes")
    assert option_value("points_per_side", "16") == 16 and option_value("box_nms_thresh", "0.5") == 0.5
