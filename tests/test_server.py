"""The server as users run it: a real process on a loopback port, hit with curl and xargs.

The servers run a random-initialised tiny model on a 4x4 grid with every filter off and an NMS
threshold of 1, so all 48 candidate masks come back (random weights give no mask under the
default thresholds).
"""

import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools.load_test import client_order, run_load_test
from sam2serve.amg import AMGConfig, MaskGenerator
from sam2serve.checkpoints import load_model
from sam2serve.modes import CPU_COMPILED_POINTS
from sam2serve.rle import rles_to_masks
from sam2serve.serving import ROUTES
from sam2serve.worker import InferenceWorker

from .conftest import make_scene
from .test_amg import assert_same_masks
from .test_worker import StubGenerator

REPO = Path(__file__).resolve().parents[1]
KEEP_EVERY_CANDIDATE = [
    # Both spellings of the options are accepted; the study's commands use underscores.
    "--points_per_side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0",
    "--box_nms_thresh", "1.0",
]
CONFIG = AMGConfig(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
MAX_PIXELS = 200 * 200
MAX_UPLOAD_MB = 1
# The README's command for many images, as a user pastes it.
README_XARGS = next(line for line in (REPO / "README.md").read_text().splitlines() if "| xargs" in line)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(*arguments: str, log_path: Path, max_pixels: int = MAX_PIXELS) -> tuple[subprocess.Popen, str]:
    """Starts `python server.py ARGUMENTS` on a port of its own (port 0: the log says which, so
    no other process can take it between a free port's choice and the server's start); returns
    once /health answers 200."""
    command = [sys.executable, str(REPO / "server.py"), *arguments, "--port", "0",
               "--max-pixels", str(max_pixels), "--max-upload-mb", str(MAX_UPLOAD_MB)]
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        if url is None:
            listening = re.search(r"listening on (http://127\.0\.0\.1:\d+)[;, ]", log_path.read_text())
            if listening is None:
                time.sleep(0.1)
                continue
            url = listening.group(1)
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not answer /health within 120 s:\n{log_path.read_text()}")


@pytest.fixture(scope="module")
def servers(tiny_checkpoint_dir, tmp_path_factory):
    """One server per mode: {"ao": url, "baseline": url}."""
    logs = tmp_path_factory.mktemp("logs")
    started = {
        "ao": start_server(str(tiny_checkpoint_dir), "tiny", *KEEP_EVERY_CANDIDATE, log_path=logs / "ao.log"),
        "baseline": start_server(str(tiny_checkpoint_dir), "tiny", *KEEP_EVERY_CANDIDATE, "--baseline",
                                 "--threads", "1", log_path=logs / "baseline.log"),
    }
    yield {mode: url for mode, (_, url) in started.items()}
    for process, _ in started.values():
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {
        "scene.jpg": make_scene(123, 157, seed=0),
        "other.png": make_scene(90, 64, seed=1),
        "third.jpg": make_scene(77, 101, seed=2),
    }
    for name, image in paths.items():
        Image.fromarray(image).save(folder / name)
    return folder


def curl(*arguments: str) -> tuple[int, bytes]:
    """Runs curl -s; returns the HTTP status and the body."""
    result = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *arguments],
                            capture_output=True, timeout=300, check=True)
    body, _, status = result.stdout.rpartition(b"\n")
    return int(status), body


def test_health_reports_mode_and_random_weights(servers):
    with urllib.request.urlopen(servers["baseline"] + "/health") as response:
        info = json.load(response)
    assert info["mode"] == "baseline"
    assert "RANDOM" in info["model"] and info["weights"] == "random"
    assert info["prompts"] is True
    assert info["amg"]["points_per_side"] == 4
    assert info["kernels"] == "sam2's SAM2AutomaticMaskGenerator"
    assert info["threads"] == 1  # --threads 1; the ao server keeps torch's own count
    with urllib.request.urlopen(servers["ao"] + "/health") as response:
        assert json.load(response)["threads"] >= 1


def test_web_page_and_its_files_are_served(servers):
    with urllib.request.urlopen(servers["ao"] + "/") as response:
        assert response.headers.get_content_type() == "text/html"
        page = response.read().decode()
    for asset in ("/static/app.js", "/static/style.css"):
        assert f'"{asset[1:]}"' in page  # relative, as the page's requests are: it works under a route prefix too
        with urllib.request.urlopen(servers["ao"] + asset) as response:
            text = response.read().decode()
            assert len(text) > 1000
            assert not re.findall(r'(?:fetch|request)\("/', text), asset  # no request by absolute path


def test_upload_rle_ao_equals_baseline_and_in_process(servers, image_files, tiny_checkpoint_dir):
    path = image_files / "scene.jpg"
    answers = {}
    for mode, url in servers.items():
        status, body = curl("-X", "POST", url + "/upload_rle", "-F", f"image=@{path}")
        assert status == 200
        answers[mode] = json.loads(body)
    assert list(answers["ao"]) == [f"mask_{i}" for i in range(48)]  # every candidate, in NMS order
    assert_same_masks(list(answers["ao"].values()), list(answers["baseline"].values()))

    # The server decodes the JPEG as PIL does and runs the same pipeline as in-process code.
    image = np.array(Image.open(path).convert("RGB"))
    model = load_model(tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt", "tiny", "cpu").model
    assert list(answers["ao"].values()) == MaskGenerator(model, CONFIG).generate(image)

    masks = rles_to_masks(list(answers["ao"].values()))
    assert masks.shape == (48, *image.shape[:2])


def test_xargs_curl_writes_one_json_per_line(servers, image_files, tmp_path):
    """README's command, pasted: one line per path, in order, whatever the file names hold (an
    apostrophe stopped xargs, a comma or semicolon split curl's -F, shifting later lines; a double
    quote ended curl's quoted name: an empty line)."""
    names = ["scene.jpg", "other.png", "third.jpg", "other.png", "dog's photo.jpg", "a,b;type=text.png",
             'the "best" one.jpg', 'back\\slash\\".png']
    for name, original in zip(names[4:], ["scene.jpg", "other.png", "scene.jpg", "other.png"]):
        shutil.copy(image_files / original, tmp_path / name)
    paths = [image_files / name for name in names[:4]] + [tmp_path / name for name in names[4:]]
    (tmp_path / "image_paths").write_text("".join(f"{path}\n" for path in paths))
    command = README_XARGS.replace("http://127.0.0.1:5000", servers["ao"])
    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=300)
    lines = (tmp_path / "rle_masks").read_text().splitlines()
    assert len(lines) == len(names)
    for path, line in zip(paths, lines):
        masks = rles_to_masks(list(json.loads(line).values()))
        height, width = np.array(Image.open(path)).shape[:2]
        assert masks.shape == (48, height, width)
    assert lines[1] == lines[3] == lines[5] == lines[7] and lines[0] == lines[4] == lines[6]  # same image, same answer


def test_upload_draws_masks_over_the_image(servers, image_files, tmp_path):
    path = image_files / "other.png"
    status, _ = curl("-X", "POST", servers["ao"] + "/upload", "-F", f"image=@{path}",
                     "--output", str(tmp_path / "out.png"))
    assert status == 200
    drawn = Image.open(tmp_path / "out.png")
    original = np.array(Image.open(path))
    assert drawn.format == "PNG" and drawn.mode == "RGB"
    assert drawn.size == (original.shape[1], original.shape[0])
    assert np.abs(np.array(drawn).astype(int) - original).mean() > 5  # masks are visible


def bad_uploads(folder: Path, image_files: Path) -> dict[str, tuple[list[str], int, str]]:
    """name -> (curl arguments after the URL, expected status, a word the error must contain)."""
    scene = image_files / "scene.jpg"
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    jpeg = scene.read_bytes()
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    # Small file, many pixels: refused from its header, before decoding.
    Image.new("RGB", (400, 400)).save(folder / "many_pixels.png")
    (folder / "huge.bin").write_bytes(np.random.default_rng(0).bytes(2 * 1024 * 1024))
    return {
        "wrong_field_name": (["-F", f"file=@{scene}"], 400, "'image'"),
        "path_without_at": (["-F", f"image={scene}"], 400, "put @ before the file's path"),
        # A setting in the form, not the URL, was ignored without a word.
        "setting_as_form_field": (["-F", f"image=@{scene}", "-F", "pred_iou_thresh=0.6"], 400,
                                  "unknown form fields 'pred_iou_thresh'; the form has the file 'image' (settings and "
                                  "format go in the URL's query"),
        "image_as_file_and_text": (["-F", f"image=@{scene}", "-F", "image=x"], 400, "as a file and as text"),
        "another_file": (["-F", f"image=@{scene}", "-F", f"mask=@{scene}"], 400, "unknown form fields 'mask'"),
        # An image as the body (test_an_image_sent_as_the_body_...): one that is none, or none at all.
        "raw_body_not_an_image": (["--data-binary", f"@{folder / 'text.jpg'}", "-H", "Content-Type: image/jpeg"], 400,
                                  "not an image"),
        "raw_body_empty": (["-H", "Content-Type: image/png"], 400, "the body is empty"),
        "form_with_an_image_type": (["-F", f"image=@{scene}", "-H", "Content-Type: image/jpeg"], 400,
                                    "the body is a multipart form, but its Content-Type is not multipart/form-data"),
        "form_as_octet_stream": (["-F", f"image=@{scene}", "-H", "Content-Type: application/octet-stream"], 400,
                                 "the body is a multipart form, but its Content-Type is not multipart/form-data"),
        "form_as_json": (["-F", f"image=@{scene}", "-H", "Content-Type: application/json"], 400,
                         "the body is a multipart form, but its Content-Type is not multipart/form-data"),
        "form_as_url_encoded": (["-F", f"image=@{scene}", "-H", "Content-Type: application/x-www-form-urlencoded"],
                                400, "the body is a multipart form, but its Content-Type is not multipart/form-data"),
        "json_body": (["--data", '{"image": "scene.jpg"}', "-H", "Content-Type: application/json"], 400,
                      "the body is application/json, not a multipart form"),
        "raw_body_truncated": (["--data-binary", f"@{folder / 'truncated.jpg'}", "-H",
                                "Content-Type: application/octet-stream"], 400, "decoded"),
        "raw_body_too_large": (["--data-binary", f"@{folder / 'huge.bin'}", "-H", "Content-Type: image/jpeg"], 413,
                               "bytes"),
        # curl --data-binary's own type: no form, and the error says which header to send.
        "photo_as_url_encoded_body": (["--data-binary", f"@{scene}"], 400, "the body with its type (curl "
                                      "--data-binary @file.jpg -H 'Content-Type: image/jpeg')"),
        "multipart_without_boundary": (["--data-binary", f"@{scene}", "-H", "Content-Type: multipart/form-data"],
                                       400, "names no boundary"),
        "other_multipart_type": (["-F", f"image=@{scene}", "-H", "Content-Type: multipart/mixed"], 400,
                                 "the body is a multipart form, but its Content-Type is not multipart/form-data"),
        "no_body": ([], 400, "'image'"),
        "empty_file": (["-F", f"image=@{folder / 'empty.jpg'}"], 400, "empty"),
        "not_an_image": (["-F", f"image=@{folder / 'text.jpg'}"], 400, "not an image"),
        "truncated": (["-F", f"image=@{folder / 'truncated.jpg'}"], 400, "decoded"),
        "too_many_pixels": (["-F", f"image=@{folder / 'many_pixels.png'}"], 413, "pixels"),
        "upload_too_large": (["-F", f"image=@{folder / 'huge.bin'}"], 413, "bytes"),
    }


@pytest.mark.parametrize("endpoint", ["/upload_rle", "/upload"])
def test_bad_input_gets_json_error_and_server_keeps_serving(servers, image_files, tmp_path, endpoint):
    url = servers["ao"] + endpoint
    for name, (arguments, expected_status, word) in bad_uploads(tmp_path, image_files).items():
        status, body = curl("-X", "POST", url, *arguments)
        assert status == expected_status, (name, body)
        assert word in json.loads(body)["error"], (name, body)
    status, body = curl(servers["ao"] + "/no_such_route")  # the endpoints named, each with its method
    error = json.loads(body)["error"]
    assert status == 404 and all(re.search(rf"{method} [^;]*{re.escape(path)}(?![\w/])", error)
                                 for path, method in ROUTES.items())
    status, body = curl(servers["ao"] + "/static/no_such_file.js")  # the page's files named, not the endpoints
    assert (status, json.loads(body)["error"]) == (
        404, "not found: the web page's files are /static/app.js and /static/style.css")
    status, body = curl(url)  # a browser's address bar: the method, and what to send
    assert (status, json.loads(body)["error"]) == (
        405, f"GET {endpoint}: this endpoint takes POST, with the image, as curl -F 'image=@file.jpg' sends it")
    status, _ = curl("-X", "POST", url, "-F", f"image=@{image_files / 'third.jpg'}", "--output", "/dev/null")
    assert status == 200


def test_an_image_sent_as_the_body_is_answered_as_the_same_image_in_a_form(servers, image_files):
    """curl --data-binary @file.jpg -H 'Content-Type: image/jpeg', any other image/* type,
    application/octet-stream, or no Content-Type (a client library's raw bytes): the answer of the
    same image in the multipart field 'image', on /upload_rle (settings and format in the URL),
    /upload and /embed. /segment, whose prompts come beside the image, takes it in a form."""
    scene = image_files / "scene.jpg"
    for endpoint in ("/upload_rle", "/upload_rle?format=coco&pred_iou_thresh=0.5", "/upload", "/embed"):
        url = servers["ao"] + endpoint
        in_form = curl("-X", "POST", url, "-F", f"image=@{scene}")
        assert in_form[0] == 200
        for content_type in ("image/jpeg", "image/png", "application/octet-stream", None):
            header = f"Content-Type: {content_type}" if content_type else "Content-Type:"  # curl: no such header
            assert curl("-X", "POST", url, "--data-binary", f"@{scene}", "-H", header) == in_form, (endpoint, header)
    status, body = curl("-X", "POST", servers["ao"] + "/segment", "--data-binary", f"@{scene}", "-H",
                        "Content-Type: image/jpeg")
    assert status == 400 and "or a multipart form with image and prompts" in json.loads(body)["error"]


def run_server_expecting_exit(*arguments: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "server.py"), *arguments],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    return result


def test_unknown_mode_is_refused():
    result = run_server_expecting_exit("--mode", "turbo")
    assert "invalid choice: 'turbo'" in result.stderr


def test_missing_checkpoint_offline_exits_with_instructions(tmp_path):
    folder = tmp_path / "sam2"
    result = run_server_expecting_exit(str(folder), "large", "--checkpoint-url", "http://127.0.0.1:9")
    assert "sam2.1_hiera_large.pt" in result.stderr
    assert "http://127.0.0.1:9/sam2.1_hiera_large.pt" in result.stderr
    assert "curl -L -o" in result.stderr
    assert not folder.exists()  # nothing left behind by a download that never started


def test_damaged_checkpoint_exits_with_what_to_do(tmp_path):
    (tmp_path / "sam2.1_hiera_tiny.pt").write_bytes(b"PK\x03\x04 half a download")
    result = run_server_expecting_exit(str(tmp_path), "tiny", "--port", "0")
    assert "sam2.1_hiera_tiny.pt is not a torch checkpoint, or it is damaged" in result.stderr
    assert "delete it and download it again" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("option, value, rule", [
    ("--max-upload-mb", "nan", "a finite number, at least 0.01"), ("--max-upload-mb", "0", "a finite number, at"),
    ("--max-upload-mb", "1e-9", "a finite number, at least 0.01 (10 KiB)"),  # refused every upload
    ("--request-timeout", "nan", "above 0 and at most"), ("--request-timeout", "-1", "above 0 and at most"),
    ("--request-timeout", "1e10", "above 0 and at most 9223372036"),  # past it, each request answered 500
    ("--embedding-cache-mb", "inf", "a finite number, 0 or more"), ("--embedding-cache-mb", "-1", "a finite"),
    ("--threads", "0", "1 or more"), ("--batch-size", "0", "1 or more"), ("--max-queue", "-2", "1 or more"),
    ("--max-connections", "0", "1 or more"), ("--connection-timeout", "0", "1 or more"),
])
def test_numbers_out_of_range_are_refused_in_one_line(option, value, rule, capsys):
    """Checked as the options are read (a NaN or an infinite size used to end in a traceback, a
    negative upload limit to refuse every upload, a request timeout past Python's longest wait to
    answer every request with an OverflowError)."""
    import server

    with pytest.raises(SystemExit) as stopped:
        server.parse_args([option, value])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and f"argument {option}" in error and f"must be {rule}" in error


@pytest.mark.parametrize("arguments, message", [
    (["--port", "-1"], "--port must be between 0 (any free port) and 65535"),
    (["--max-pixels", "0"], "--max-pixels must be between 1 and"),  # every image would get 413
    (["--max-pixels", "-5"], "--max-pixels must be between 1 and"),
])
def test_numbers_below_a_range_checked_after_reading_are_refused_in_one_line(arguments, message, capsys):
    import server

    with pytest.raises(SystemExit) as stopped:
        server.parse_args(arguments)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert server.parse_args(["--port", "0", "--max-pixels", "1"]).max_pixels == 1  # the ends themselves are taken


@pytest.mark.parametrize("device, between_batches",
                         [("cpu", True), ("cpu:0", True), ("cuda", False), ("cuda:1", False)])
def test_prompt_sets_are_decoded_between_an_images_batches_on_a_cpu_alone(monkeypatch, device, between_batches):
    """server.py's worker decodes prompt sets between an image's batches on a CPU, however the
    CPU is named (--device cpu:0 was taken for a GPU: a click waited for the whole image)."""
    import server

    class Built(Exception):
        pass

    def worker(*args, **options):
        raise Built(options)

    monkeypatch.setattr(server, "set_up_cpu_process", lambda device, threads: None)  # this process's settings
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU here: as if there were two
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(server, "InferenceWorker", worker)
    monkeypatch.setattr(server, "set_up_logging", lambda: None)
    with pytest.raises(Built) as built:
        server.main(["--device", device])
    assert built.value.args[0] == {"decodes_between_batches": between_batches}


@pytest.fixture()
def stop_handlers_restored():
    import server

    saved = {signum: signal.getsignal(signum) for signum in server.STOP_SIGNALS}
    yield server
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_signal_repeated_within_a_second_is_the_same_stop_a_later_one_stops_at_once(stop_handlers_restored):
    """server.py's handlers, in this process: the same stop sent twice within SAME_STOP_WITHIN_S
    (by `timeout` and to the process group, say) is one stop; a later signal stops at once."""
    server = stop_handlers_restored
    worker = InferenceWorker()
    worker.start(StubGenerator())
    server.stop_on_signals(worker, threading.Event())
    signal.raise_signal(signal.SIGTERM)
    assert worker.stopping
    signal.raise_signal(signal.SIGINT)  # at once: the same stop, not "stop at once"
    time.sleep(server.SAME_STOP_WITHIN_S + 0.1)
    with pytest.raises(SystemExit, match="stopped at once by a second SIGTERM"):
        signal.raise_signal(signal.SIGTERM)


def test_a_signal_while_the_model_loads_ends_the_start(stop_handlers_restored):
    server = stop_handlers_restored
    worker = InferenceWorker()  # not ready: the model is loading
    server.stop_on_signals(worker, threading.Event())
    with pytest.raises(SystemExit, match="stopped by SIGHUP while the model was loading"):
        signal.raise_signal(signal.SIGHUP)
    assert not worker.stopping


def test_the_http_server_ending_while_the_model_loads_ends_the_start_with_why(stop_handlers_restored):
    """stop_loading(), called by the HTTP server's thread once it has ended, stops the main
    thread's loading at once, a wait too (a compile waits on its workers): the loading went on
    for minutes, then the server exited."""
    server = stop_handlers_restored
    worker = InferenceWorker()  # not ready: the model is loading
    http_failed = threading.Event()
    stop_loading = server.stop_on_signals(worker, http_failed)

    def http_fails() -> None:
        http_failed.set()
        stop_loading()

    timer = threading.Timer(0.1, http_fails)
    timer.daemon = True
    timer.start()
    started = time.monotonic()
    with pytest.raises(SystemExit, match=r"^error: the HTTP server stopped while the model was loading"):
        threading.Event().wait(60)
    assert time.monotonic() - started < 30, "the wait went on: stopped only once it was over"
    assert not worker.stopping


def test_a_stop_signal_once_the_http_server_failed_is_no_clean_stop(stop_handlers_restored):
    """A stop signal after the HTTP server ended by itself (stop_loading's, sent just as the
    model became ready, or one from outside) exits with the error: taken as a clean stop, it
    would end the server with status 0."""
    server = stop_handlers_restored
    worker = InferenceWorker()
    worker.start(StubGenerator())
    http_failed = threading.Event()
    server.stop_on_signals(worker, http_failed)
    http_failed.set()
    with pytest.raises(SystemExit, match=r"^error: the HTTP server stopped \(the log says why\); the requests"):
        signal.raise_signal(signal.SIGTERM)
    assert not worker.stopping


@pytest.mark.parametrize("option, value, rule", [
    ("--pred-iou-thresh", "80", "within [0, 1], got 80.0"), ("--points_per_side", "0", "at least 1, got 0"),
    ("--stability-score-offset", "0", "above 0 and at most 1000"),
    ("--points-per-batch", "100000000000000000000", "at most 1048576 (the largest grid)"),
])
def test_mask_settings_out_of_range_are_refused_in_the_options_words(option, value, rule, capsys):
    """The mask-generation options are checked by AMGConfig, whose message named the setting
    ("pred_iou_thresh must be ..."), not the option the user typed."""
    import server

    with pytest.raises(SystemExit) as stopped:
        server.parse_args([option, value])
    assert stopped.value.code == 2
    assert f"error: argument {option.replace('_', '-')}: must be {rule}" in capsys.readouterr().err


def test_a_shortened_option_names_the_option_of_both_spellings(capsys):
    """argparse called `--crop` ambiguous: it matched --crop-n-layers and --crop_n_layers, one
    option's two spellings. A prefix of several options lists each once."""
    import server

    assert server.parse_args(["--crop", "1"]).crop_n_layers == 1
    assert server.parse_args(["--box_nms", "0.5", "--use"]).box_nms_thresh == 0.5
    with pytest.raises(SystemExit):
        server.parse_args(["--point", "3"])
    assert "--point could match --points-per-side, --points-per-batch\n" in capsys.readouterr().err


def test_more_threads_than_cores_are_refused(capsys):
    import server

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert server.parse_args(["--threads", str(cores)]).threads == cores
    with pytest.raises(SystemExit) as stopped:
        server.parse_args(["--threads", str(cores + 1)])
    assert stopped.value.code == 2 and f"may use {cores} cores; give at most {cores}" in capsys.readouterr().err


def test_a_batch_larger_than_the_queue_allows_is_refused(capsys):
    """The worker batches the request it waits for with those queued behind it: with --max-queue 4,
    5 at most: --batch-size 8 would silently mean 5."""
    import server

    assert server.parse_args(["--batch-size", "5", "--max-queue", "4"]).batch_size == 5
    with pytest.raises(SystemExit) as stopped:
        server.parse_args(["--batch-size", "8", "--max-queue", "4"])
    assert stopped.value.code == 2 and "raise --max-queue to 7 or more" in capsys.readouterr().err


@pytest.mark.parametrize("arguments", [["--mode", "ao", "--fast"], ["--fast", "--mode", "ao"], ["--baseline", "--fast"]])
def test_two_ways_of_naming_the_mode_are_refused_even_the_default(arguments, capsys):
    """In process too, where "ao" is the very string of the default (argparse counts an option
    given its default's own object as not given)."""
    import server

    with pytest.raises(SystemExit):
        server.parse_args(arguments)
    assert "not allowed with argument" in capsys.readouterr().err
    assert server.parse_args([]).mode == "ao" and server.parse_args(["--fast", "--furious"]).mode == "fast_furious"


def test_cors_origins_are_taken_as_browsers_send_them(capsys):
    """--cors-origin, repeated, or *, written as browsers write an Origin; an origin with a path or a
    trailing / (no browser sends one: it would match no request) is refused in one line."""
    import server

    assert server.parse_args([]).cors_origin == []
    given = ["HTTP://LocalHost:3000", "*", "http://localhost:80", "https://tool.example:443", "http://bücher.example"]
    assert server.parse_args([arg for value in given for arg in ("--cors-origin", value)]).cors_origin == [
        "http://localhost:3000", "*", "http://localhost", "https://tool.example",
        "http://xn--bcher-kva.example"]  # as a browser writes them (no page sent the others)
    for value in ("http://localhost:3000/", "localhost:3000", "http://a/tool", "http://a:99999"):
        with pytest.raises(SystemExit) as stopped:
            server.parse_args(["--cors-origin", value])
        error = capsys.readouterr().err
        assert stopped.value.code == 2 and f"{value!r} is not an origin: * or scheme://host[:port]" in error


def test_pixel_limit_beyond_what_pillow_opens_is_refused():
    result = run_server_expecting_exit("--max-pixels", "300000000")
    assert "--max-pixels must be between 1 and 178956970" in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["--port", "70000"], "--port must be between 0 (any free port) and 65535"),  # it used to wrap to 4464
    (["--host", "no.such.host.invalid"], "error: cannot listen on no.such.host.invalid:5000"),
])
def test_addresses_that_cannot_be_listened_on_are_refused_in_one_line(arguments, message):
    result = run_server_expecting_exit(*arguments)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_more_threads_than_the_system_starts_are_refused_in_one_line():
    """--max-queue sizes the HTTP server's threads (one per request admitted): a system that
    starts no more (its limit on threads, or on memory for their stacks) ends the start with
    what to lower, not a traceback. Here threading refuses a 21st thread."""
    starts_at_most_20_threads = (
        "import runpy, sys, threading\n"
        "start = threading.Thread.start\n"
        "def limited(thread):\n"
        "    if threading.active_count() >= 20:\n"
        "        raise RuntimeError(\"can't start new thread\")\n"
        "    start(thread)\n"
        "threading.Thread.start = limited\n"
        "sys.argv = ['server.py', '--port', '0', '--max-queue', '100']\n"
        "runpy.run_path('server.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", starts_at_most_20_threads], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert ("error: cannot start 105 threads for the requests admitted at once (--max-queue 100 + --batch-size 1 "
            "+ 4): can't start new thread; lower --max-queue") in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_starting_ends_it_in_one_line(signum):
    """Handled from the first moment (as PID 1 in a container, an unhandled one is ignored).
    Started as from a terminal: the signal not ignored, whatever the test run inherited."""
    process = subprocess.Popen([sys.executable, str(REPO / "server.py"), "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signum, signal.SIG_DFL))
    time.sleep(1.0)  # importing torch, or loading the model
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1, stderr
    assert f"stopped by {signum.name} while" in stderr and "Traceback" not in stderr


def test_a_server_started_under_nohup_keeps_serving_after_a_hangup():
    """A signal the server was started with ignored (SIGHUP under nohup) stays ignored; the
    others still stop it."""
    process = subprocess.Popen([sys.executable, str(REPO / "server.py"), "--port", "0"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    time.sleep(1.0)
    process.send_signal(signal.SIGHUP)
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    # Stopped while loading (exit 1) or after, answering what it accepted first (exit 0).
    assert process.returncode in (0, 1) and "SIGTERM" in stderr and "SIGHUP" not in stderr, stderr


def test_checkpoint_dir_without_model_type_is_refused(tmp_path):
    result = run_server_expecting_exit(str(tmp_path))
    assert "give both a checkpoint folder and a model type" in result.stderr


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--furious"], "--furious goes with --fast"),
        (["--baseline", "--fast"], "argument --fast: not allowed with argument --baseline"),
        (["--mode", "ao", "--fast", "--furious"], "argument --fast: not allowed with argument --mode"),
        (["--load-fast", "somewhere"], "go with --fast"),
        (["--fast", "--save-fast", "a", "--load-fast", "b"], "not both"),
        # An export or a load compiles nothing: the mode given was left unused without a word.
        (["--fast", "--save-fast", "a", "--compile-mode", "default"], "give --compile-mode or --save-fast/--load-fast"),
        (["--fast", "--load-fast", str(REPO), "--compile-mode", "default"], "compile nothing with torch.compile"),
        (["--compile-mode", "default"], "go with --fast"),
        (["--fast", "--compile-mode", "fastest"], "invalid choice: 'fastest'"),
        (["--fast", "--save-fast", ""], "take a folder"),
        (["--fast", "--save-fast", str(REPO / "README.md")], "README.md is a file, not a folder"),
        # Before a checkpoint's download (minutes), not after its load
        (["--fast", "--load-fast", str(REPO / "no-such-folder")], "no-such-folder: no such folder"),
        (["--fast", "--load-fast", str(REPO / "README.md")], "README.md: no such folder (a file)"),
        (["--fast", "--cpu-target", "x86-64-v3"], "--cpu-target goes with --save-fast"),
        (["--fast", "--save-fast", "a", "--cpu-target", "x86-64-v2"], "invalid choice: 'x86-64-v2'"),
    ],
)
def test_fast_options_are_checked(arguments, message):
    assert message in run_server_expecting_exit(*arguments).stderr



def test_concurrent_clients_get_their_own_answers(tiny_checkpoint_dir, image_files, tmp_path):
    """The load test, small: 4 clients x 3 images through a queue of 2 and batches of up to 3.
    Every answer equals the answer to that image sent alone; full-queue 503s are retried."""
    process, url = start_server(str(tiny_checkpoint_dir), "tiny", *KEEP_EVERY_CANDIDATE, "--batch-size", "3",
                                "--max-queue", "2", log_path=tmp_path / "server.log")
    try:
        images = {path.name: path.read_bytes() for path in sorted(image_files.iterdir())}
        report = run_load_test(url, images, clients=4, per_client=3, time_limit_s=240)
        assert report.ok, report.table()
        assert report.requests == 12 and len(report.latencies_s) == 12
        with urllib.request.urlopen(url + "/metrics") as response:
            metrics = response.read().decode()
        # 3 single requests + 12 from the clients, each answered once.
        assert 'sam2_requests_total{endpoint="/upload_rle",method="POST",status="200"} 15.0' in metrics
        assert "sam2_batch_size_count" in metrics
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_load_test_fails_a_server_that_answers_the_same_wrong_thing_every_time():
    """Each reference (a request sent alone) must be this service's answer for its image, and
    GET /health must say "ok": another service on the port, or an error page sent with 200,
    answered the same every time and passed as "correct"."""
    from io import BytesIO

    from pycocotools import mask as mask_utils

    from sam2serve.rle import answer_text, masks_to_rle_reference
    from tools.load_test import Request, answer_problem, retry_after_s

    answers = {"health": b'{"status": "ok"}', "post": b"<html>not this service</html>"}

    class Fake(http.server.BaseHTTPRequestHandler):
        def answer(self, body: bytes) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.answer(answers["health"])

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.answer(answers["post"])

        def log_message(self, *args):
            pass

    image = BytesIO()
    Image.fromarray(make_scene(30, 40, seed=1)).save(image, format="PNG")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for post, message in [(b"<html>not this service</html>", "not JSON"), (b"{}", None),
                              (b"[]", "not a JSON object"),
                              (b'{"mask_0": {"size": [40, 30], "counts": "0"}}', "not 40 x 30"),
                              (b'{"mask_0": {"size": [20, 20], "counts": [400]}}', "not all the image's [30, 40]")]:
            answers["post"] = post
            if message is None:  # an image without masks: the test goes on (and passes)
                assert run_load_test(url, {"a.png": image.getvalue()}, clients=1, per_client=1).ok
                continue
            with pytest.raises(RuntimeError, match=re.escape(message)):
                run_load_test(url, {"a.png": image.getvalue()}, clients=1, per_client=1)
        answers["health"] = b"<html>ok</html>"
        with pytest.raises(RuntimeError, match="GET /health answered 200, not"):
            run_load_test(url, {"a.png": image.getvalue()}, clients=1, per_client=1)
    finally:
        server.shutdown()

    masks = np.zeros((2, 30, 40), dtype=bool)
    masks[0, 5:10, 5:20] = masks[1, 20:, :] = True
    rles = masks_to_rle_reference(torch.from_numpy(masks))
    upload = Request("a", "/upload_rle", b"", "")
    assert answer_problem(upload, answer_text(rles).encode()) is None
    short = {**rles[0], "counts": rles[0]["counts"][:-1]}
    assert "not 30 x 40" in answer_problem(upload, answer_text([short]).encode())
    compressed = [{**rle, "counts": mask_utils.frPyObjects(rle, 30, 40)["counts"].decode()} for rle in rles]
    assert answer_problem(upload, answer_text(compressed).encode()) is None
    assert "not 30 x 40" in answer_problem(upload, answer_text([{**compressed[0], "counts": "0"}]).encode())
    assert "not masks mask_0" in answer_problem(upload, b'{"mask_1": {}}')
    segment = Request("a /segment", "/segment", json.dumps({"prompts": [{}, {}]}).encode(), "", size=(30, 40))
    result = {"masks": rles, "iou_predictions": [0.9, 0.8]}
    assert answer_problem(segment, json.dumps({"results": [result] * 2}).encode()) is None
    assert "not 2 results" in answer_problem(segment, json.dumps({"masks": rles}).encode())
    assert "not 2 results" in answer_problem(segment, json.dumps({"results": []}).encode())
    for wrong in [{"masks": rles}, {**result, "iou_predictions": 0.9}, {**result, "iou_predictions": ["x", "y"]}]:
        assert "predicted IoU" in answer_problem(segment, json.dumps({"results": [wrong] * 2}).encode()), wrong
    other_size = Request("a /segment", "/segment", segment.body, "", size=(40, 30))
    assert "not all the image's [40, 30]" in answer_problem(other_size, json.dumps({"results": [result] * 2}).encode())
    mixed = [rles[0], {"size": [2, 3], "counts": [6]}]
    assert "not all the image's" in answer_problem(upload, answer_text(mixed).encode())
    embed = Request("a /embed", "/embed", b"", "")
    assert answer_problem(embed, b'{"image_id": "x", "size": [30, 40]}') is None
    assert "not an image id" in answer_problem(embed, b'{"id": "x"}')  # was a KeyError's traceback
    # A Retry-After of 0 waits 1 s: the request was sent again at once, thousands of times.
    assert retry_after_s({"Retry-After": "0"}) == retry_after_s({}) == 1.0 and retry_after_s({"Retry-After": "3"}) == 3


def test_load_test_refuses_other_hosts():
    with pytest.raises(ValueError, match="loopback"):
        run_load_test("http://192.0.2.1:5000", {"a": b""}, clients=1, per_client=1)
    with pytest.raises(ValueError, match="give the server as http://HOST:PORT"):
        run_load_test("127.0.0.1:5000", {"a": b""}, clients=1, per_client=1)
    with pytest.raises(ValueError, match="without a path"):  # the test adds the endpoints' paths itself
        run_load_test("http://127.0.0.1:5000/upload_rle", {"a": b""}, clients=1, per_client=1)


# A stub's answer to the load test's /segment of an image of 4 x 6 (its two prompt sets).
SEGMENT_ANSWER = json.dumps({"results": [{"masks": [{"size": [4, 6], "counts": [24]}], "iou_predictions": [0.5]}] * 2,
                             }).encode()


class AnswersEveryPost(http.server.BaseHTTPRequestHandler):
    """A stub server's handler: 200 with the same body to every POST (no masks), whose bodies it
    keeps; GET /health says ok."""
    bodies: list[bytes] = []

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "15")
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def do_POST(self):
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def stub_server(handler: type):
    """A stub HTTP server of that request handler on a port of its own, serving while in use: its URL."""
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_port}"
        finally:
            server.shutdown()


def load_test_against(handler: type, clients: int, per_client: int, interactive: bool = False):
    """The load test's report against a stub server of that request handler."""
    with stub_server(handler) as url:
        return run_load_test(url, {"a.jpg": b"pixels"}, clients=clients, per_client=per_client, time_limit_s=30,
                             interactive=interactive)


def test_load_test_counts_dropped_connections_as_failures():
    """A server that answers the single request, then closes every connection without an
    answer: each of the clients' requests is a failure, none is left out of the count."""
    class AnswersOnce(AnswersEveryPost):
        bodies = []

        def do_POST(self):
            if self.bodies:  # the single request was answered
                self.rfile.read(int(self.headers["Content-Length"]))
                self.close_connection = True  # no status line: the client sees the connection drop
                return
            super().do_POST()

    report = load_test_against(AnswersOnce, clients=2, per_client=3)
    assert not report.ok
    assert report.planned == report.requests == 6 and report.correct == 0
    assert len(report.wrong) == 6 and all("no answer" in line for line in report.wrong), report.wrong
    assert "6 of 6 done (0 correct, 6 wrong or failed)" in report.table()


@pytest.mark.parametrize("retry_after", ["Wed, 21 Oct 2015 07:28:00 GMT", "nan"])
def test_load_test_waits_a_second_on_a_retry_after_that_is_not_seconds(retry_after):
    """Retry-After may be an HTTP date (or nonsense): the client waits a second and tries again.
    The request's latency runs from its first try: the wait is in it."""
    posts = []

    class BusyOnce(AnswersEveryPost):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(True)
            busy = len(posts) == 2  # the first of the clients' requests
            self.send_response(503 if busy else 200)
            if busy:
                self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    report = load_test_against(BusyOnce, clients=1, per_client=2)
    assert report.ok and report.retries_busy == 1, report.table()
    assert len(report.latencies_s) == 2 and max(report.latencies_s) >= 1.0


def test_load_test_clients_take_turns_through_every_request():
    """Clients sending fewer requests each than there are requests still send all of them at
    once between them (each client took the list's first ones)."""
    for count, clients, per_client in [(3, 4, 2), (5, 3, 1), (2, 2, 7)]:
        sent = np.bincount(np.concatenate([client_order(index, count, per_client) for index in range(clients)]),
                           minlength=count)
        assert sent.max() - sent.min() <= 1 and sent.sum() == clients * per_client, (count, clients, per_client)

    handler = type("Handler", (AnswersEveryPost,), {"bodies": []})
    images = {name: f"pixels of {name}".encode() for name in ("a.jpg", "b.jpg", "c.jpg")}
    with stub_server(handler) as url:
        report = run_load_test(url, images, clients=3, per_client=1, time_limit_s=30)
    assert report.ok, report.table()
    concurrent = handler.bodies[3:]  # after each request alone
    assert sorted(next(name for name in images if images[name] in body) for body in concurrent) == sorted(images)


def test_load_test_lists_twenty_failures_and_counts_the_rest():
    """Past 20 failed requests the list stopped without a word (169 failures, 20 lines)."""
    from tools.load_test import Report

    table = Report(planned=25, requests=25, wrong=[f"request {i}: 500" for i in range(25)], latencies_s=[0.1]).table()
    assert "  request 19: 500" in table and "request 20: 500" not in table
    assert table.endswith("\n  and 5 more")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_load_test_stopped_says_how_many_requests_were_in_flight(tmp_path, signum):
    """Stopped (Ctrl-C, or SIGTERM as `timeout` sends it: that one ended the test without a
    word) while each client waits on an answer: one request per client in flight,
    the rest of each client's list never sent. The requests go straight to the server: a proxy
    set for the shell (curl's http_proxy) would take them off this machine."""
    hanging, release = threading.Semaphore(0), threading.Event()

    class AnswersOnceThenHangs(AnswersEveryPost):
        bodies = []

        def do_POST(self):
            if self.bodies:  # the single request was answered
                self.rfile.read(int(self.headers["Content-Length"]))
                hanging.release()
                release.wait(60)
                return
            super().do_POST()

    (tmp_path / "a.jpg").write_bytes(b"pixels")
    environment = {name: value for name, value in os.environ.items() if name.lower() != "no_proxy"}
    with stub_server(AnswersOnceThenHangs) as url:
        test = subprocess.Popen([sys.executable, "-m", "tools.load_test", url, str(tmp_path / "a.jpg"), "--clients",
                                 "2", "--per-client", "3"],
                                env={**environment, "http_proxy": "http://127.0.0.1:9"},  # nothing listens there
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not ignored, as under &
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(2):
                while not hanging.acquire(timeout=0.5):
                    assert test.poll() is None, test.communicate()
            test.send_signal(signum)
            out, err = test.communicate(timeout=60)
        finally:
            test.kill()
            release.set()
    how = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert test.returncode == -signum, err  # ended by the signal, after its report: a shell sees 130 or 143
    assert f"0 of 6 done (0 correct, 0 wrong or failed, 4 never sent, 2 in flight when stopped by {how})" in out


def test_load_test_counts_answers_that_differ_from_the_single_requests_as_wrong(tmp_path, monkeypatch, capsys):
    """A server whose answer changes from request to request: every client's answer is wrong
    (the single request's is the reference), and the command exits 1 with the report."""
    from tools import load_test

    class AnswersDifferently(AnswersEveryPost):
        bodies = []

        def do_POST(self):
            self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            body = "{" + " " * (len(self.bodies) % 10) + "}"  # no masks, in bytes of its own
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

    report = load_test_against(AnswersDifferently, clients=2, per_client=2)
    assert not report.ok and report.requests == 4 and report.correct == 0
    assert all("answer differs from the single request's" in line for line in report.wrong), report.wrong
    (tmp_path / "a.jpg").write_bytes(b"pixels")
    with stub_server(AnswersDifferently) as url, pytest.raises(SystemExit) as ended:
        monkeypatch.setattr(sys, "argv", ["load_test", url, str(tmp_path / "a.jpg"), "--clients", "1",
                                          "--per-client", "1"])
        load_test.main()
    assert ended.value.code == 1 and "1 of 1 done (0 correct, 1 wrong or failed)" in capsys.readouterr().out


def test_load_test_refuses_a_server_that_fails_the_single_request_and_too_many_requests():
    """The references must be answers: a single request (or the /embed for an image's id)
    answered 500 ends the test at once; more
    than MAX_REQUESTS asked is refused before anything is sent."""
    from tools.load_test import MAX_REQUESTS

    class Fails(AnswersEveryPost):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(500)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    with pytest.raises(RuntimeError, match="a.jpg: the single request answered 500"):
        load_test_against(Fails, clients=1, per_client=1)
    # with --interactive, the /embed that gives the image its id
    with stub_server(Fails) as url, pytest.raises(RuntimeError, match="a.jpg: /embed answered 500"):
        run_load_test(url, {"a.jpg": b"pixels"}, clients=1, per_client=1, interactive=True)
    with pytest.raises(ValueError, match=f"at most {MAX_REQUESTS} requests"):
        run_load_test("http://127.0.0.1:9", {"a": b""}, clients=MAX_REQUESTS + 1, per_client=1)


def test_load_test_report_and_retry_after_and_client_orders():
    """A test that did not send every planned request is not ok; Retry-After absent, negative
    or 0 waits a second; each client goes through its requests in an order of
    its own."""
    from tools.load_test import Report, retry_after_s

    assert not Report(planned=3, requests=2, correct=2).ok and Report(planned=2, requests=2, correct=2).ok
    assert [retry_after_s(headers) for headers in ({}, {"Retry-After": "-5"}, {"Retry-After": "2.5"})] == [1, 1, 2.5]
    orders = [list(client_order(index, 6, 6)) for index in range(3)]
    assert all(sorted(order) == list(range(6)) for order in orders) and len({tuple(o) for o in orders}) == 3


def test_load_test_embeds_an_evicted_image_again_a_bounded_number_of_times():
    """/segment by an id the server keeps answering 404 (evicted again and again): the image is
    sent to /embed again MAX_EMBEDS_AGAIN times, then the 404 counts as a wrong answer."""
    from tools.load_test import MAX_EMBEDS_AGAIN

    posts = []

    class EvictsAtOnce(AnswersEveryPost):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(self.path)
            segment_again = self.path == "/segment" and posts.count("/segment") > 1
            body = (b'{"error":"unknown image_id"}' if segment_again else
                    b'{"image_id":"x","size":[4,6]}' if self.path == "/embed" else
                    SEGMENT_ANSWER if self.path == "/segment" else b"{}")
            self.send_response(404 if segment_again else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    report = load_test_against(EvictsAtOnce, clients=1, per_client=3, interactive=True)
    assert report.embedded_again == MAX_EMBEDS_AGAIN and report.correct == 2, report.table()
    assert report.wrong == ['a.jpg /segment: status 404, {"error":"unknown image_id"}']
    assert posts.count("/embed") == 2 + 1 + MAX_EMBEDS_AGAIN  # for its id, its reference, the client's and again


def test_load_test_sends_an_evicted_image_again_after_a_busy_answer_and_counts_other_404s_as_wrong():
    """The image of an evicted id sent to /embed again is sent once more after a 503 (its
    Retry-After), then its /segment answered; a 404 from /upload_rle (no id of its own) is a
    wrong answer, not a reason to embed anything."""
    posts, evicted = [], []

    class EvictsOnceThenBusyOnce(AnswersEveryPost):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            posts.append(self.path)
            status, body, headers = 200, b"{}" if self.path == "/upload_rle" else SEGMENT_ANSWER, {}
            if self.path == "/embed":
                body = b'{"image_id":"x","size":[4,6]}'
                if len(evicted) == 1:  # the first /embed after the eviction
                    evicted.append("busy")
                    status, body, headers = 503, b'{"error":"busy"}', {"Retry-After": "0"}
            elif posts.count(self.path) == 2:  # the client's own /segment and /upload_rle
                status, body = 404, b'{"error":"gone"}'
                if self.path == "/segment":
                    evicted.append("evicted")
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

    report = load_test_against(EvictsOnceThenBusyOnce, clients=1, per_client=3, interactive=True)
    assert (report.embedded_again, report.retries_busy, report.correct) == (1, 1, 2), report.table()
    assert report.wrong == ['a.jpg: status 404, {"error":"gone"}']
    assert posts.count("/embed") == 2 + 1 + 2  # for its id, its reference, the client's, and again twice


def test_without_checkpoint_arguments_it_serves_the_trained_micro_model(image_files, tmp_path):
    process, url = start_server("--points-per-side", "8", "--pred-iou-thresh", "0.5", "--stability-score-thresh",
                                "0.5", log_path=tmp_path / "default.log")
    try:
        with urllib.request.urlopen(url + "/health") as response:
            model = json.load(response)["model"]
        status, body = curl("-X", "POST", url + "/upload_rle", "-F", f"image=@{image_files / 'scene.jpg'}")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "SAM2.1 micro" in model and "sam2.1_hiera_micro.pt" in model and "/" not in model and "trained weights" in model
    assert status == 200 and len(json.loads(body)) >= 1
    assert "ready: serving SAM2.1 micro" in (tmp_path / "default.log").read_text()


def stop_with_requests_queued(signals: int, image: Path, tmp_path: Path, requests: int = 4,
                              server_arguments: tuple[str, ...] = ()) -> tuple[subprocess.Popen, list, str]:
    """Starts the default server (0.7 s or more per request on a CPU, with no `server_arguments`),
    sends `requests` at once, and once all but one are queued sends it SIGTERM `signals` times, the
    second 1.2 s after the first was handled (each time twice at once, as a wrapper and the process
    group would).
    Returns the process (ended), each request's (status, body) or error, and the server's log."""
    log_path = tmp_path / "server.log"
    process, url = start_server(*server_arguments, log_path=log_path)
    answers = []

    def request():
        try:
            answers.append(curl("-X", "POST", url + "/upload_rle", "-F", f"image=@{image}"))
        except subprocess.CalledProcessError as error:  # the connection closed without an answer
            answers.append(error)

    def wait_for_the_stop() -> None:  # handled between the model's operations, on its thread
        while "SIGTERM: stopping" not in log_path.read_text():
            assert time.monotonic() < deadline + 60, "the stop was not logged"
            time.sleep(0.05)

    threads = [threading.Thread(target=request, daemon=True) for _ in range(requests)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while json.loads(curl(url + "/health")[1])["queued"] < requests - 1:  # one runs, the others wait
            assert time.monotonic() < deadline, "the requests were not queued"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGTERM)  # at once: the same stop sent twice, not a second one
        for _ in range(signals - 1):
            wait_for_the_stop()
            time.sleep(1.2)
            process.send_signal(signal.SIGTERM)
        if signals == 1:  # once the stop is handled: still answering what it accepted, taking nothing new
            wait_for_the_stop()
            health = curl(url + "/health")
            assert health[0] == 503 and json.loads(health[1])["status"] == "stopping"
            status, body = curl("-X", "POST", url + "/upload_rle", "-F", f"image=@{image}")
            assert status == 503 and "stopping" in json.loads(body)["error"]
        process.wait(timeout=300)  # minutes where other work shares the cores
    finally:
        process.kill()
        for thread in threads:
            thread.join(timeout=60)
    return process, answers, log_path.read_text()


def test_sigterm_answers_every_queued_request_then_exits_cleanly(image_files, tmp_path):
    process, answers, log = stop_with_requests_queued(1, image_files / "scene.jpg", tmp_path)
    assert process.returncode == 0, log
    assert [status for status, _ in answers] == [200] * 4
    assert len({body for _, body in answers}) == 1 and len(json.loads(answers[0][1])) >= 1  # the same image
    assert "SIGTERM: stopping" in log and "stopped: every accepted request answered" in log


def test_a_second_sigterm_stops_at_once(image_files, tmp_path):
    # Seven requests queued, each of a 64x64 grid (4 times the default's work): about 20 s of work
    # left when the second signal comes 1.2 s after the first, so a CPU several times faster than
    # these still has work left then.
    process, answers, log = stop_with_requests_queued(2, image_files / "scene.jpg", tmp_path, requests=8,
                                                      server_arguments=("--points-per-side", "64"))
    assert process.returncode == 1
    assert "stopped at once by a second SIGTERM" in log and "Traceback" not in log
    assert any(isinstance(answer, Exception) for answer in answers)  # not every request was answered


@pytest.mark.parametrize("fails_while, load_s, why", [
    ("serving", 0, "error: the HTTP server stopped (the log says why); the requests it accepted are not answered"),
    ("loading", 300, "error: the HTTP server stopped while the model was loading (the log says why)"),
    ("loading, stop signals ignored", 3,
     "error: the HTTP server stopped while the model was loading (the log says why)"),
])
def test_the_server_exits_with_an_error_when_its_http_server_fails(fails_while, load_s, why, tmp_path):
    """The HTTP server's thread ending by an error ended server.py with status 0 and no word: a
    supervisor that restarts a failed server would not have. While the model loads (here a
    load of 5 minutes, as a fast mode's compile), it ends at once, not when the loading is over;
    where no stop signal can stop the loading (each ignored from the start), once it is over."""
    script = tmp_path / "failing_http.py"
    script.write_text(f"""
import signal
import sys
import threading
import time
sys.path.insert(0, {str(REPO)!r})
import server

if {fails_while!r} == "loading, stop signals ignored":
    for signum in server.STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
workers = []


class RecordedWorker(server.InferenceWorker):
    def __init__(self, *arguments, **options):
        super().__init__(*arguments, **options)
        workers.append(self)


class FailingHTTPServer:
    effective_host, effective_port = "127.0.0.1", 1

    def run(self):
        while {fails_while!r} == "serving" and not (workers and workers[0].ready):
            time.sleep(0.01)
        raise RuntimeError("the event loop broke")

    def close(self):
        print("closed", flush=True)


def slow_load_pipeline(*arguments, **options):
    threading.Event().wait({load_s})
    return load_pipeline(*arguments, **options)


load_pipeline = server.load_pipeline
server.load_pipeline = slow_load_pipeline
server.InferenceWorker = RecordedWorker
server.create_http_server = lambda *arguments, **options: FailingHTTPServer()
server.main(["--points-per-side", "2"])
""")
    ended = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert ended.returncode == 1 and ended.stdout == "closed\n"
    assert ended.stderr.count("Traceback") == 1 and "the HTTP server failed" in ended.stderr
    assert ended.stderr.rstrip().endswith(why)


def test_help_shows_each_options_default_but_not_a_switchs_off_nor_none(capsys, monkeypatch):
    """--help gives the defaults an option has (the grid's 32, the port's 5000), but no
    "(default: False)" after a switch such as --use-m2m or --access-log, nor "(default: None)"."""
    import server

    monkeypatch.setenv("COLUMNS", "200")  # one option per line: its default beside its help
    with pytest.raises(SystemExit) as stopped:
        server.parse_args(["--help"])
    text = capsys.readouterr().out
    assert stopped.value.code == 0
    assert re.search(r"points along each side of the prompt grid \(default: 32\)", text)
    assert "(default: 5000)" in text
    assert "(default: False)" not in text and "(default: None)" not in text and "(default: [])" not in text
    use_m2m = [line for line in text.splitlines() if line.lstrip().startswith("--use-m2m")]
    assert use_m2m and "default" not in use_m2m[0]


def test_points_per_batch_left_unset_are_the_modes_own_for_how_its_kernels_run(tmp_path):
    """Without --points-per-batch, the mode's: sam2's 64 for eager kernels (ao, and a fast mode on
    a CPU by default), a few where a fast mode's kernels are compiled, exported or loaded on a
    CPU; a value given is kept."""
    import server

    def points(*arguments: str) -> int:
        return server.parse_args(["--device", "cpu", *arguments]).amg.points_per_batch

    assert points() == points("--fast") == 64
    assert CPU_COMPILED_POINTS < 64
    assert points("--fast", "--compile-mode", "default") == CPU_COMPILED_POINTS
    assert points("--fast", "--load-fast", str(tmp_path)) == CPU_COMPILED_POINTS
    assert points("--fast", "--save-fast", str(tmp_path / "kernels")) == CPU_COMPILED_POINTS
    assert points("--fast", "--compile-mode", "default", "--points-per-batch", "32") == 32
