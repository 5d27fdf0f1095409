"""Checkpoints: the official format, random initialisation, download and clear failures."""

import functools
import http.server
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest
import torch

from sam2serve.checkpoints import (
    DEFAULT_CHECKPOINT_DIR,
    CheckpointUnavailable,
    WrongCheckpoint,
    ensure_checkpoint,
    load_model,
    model_size,
    write_random_checkpoint,
)


def test_random_checkpoint_is_official_format_and_deterministic(tiny_checkpoint_dir, tiny_model, tmp_path):
    path = tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint["model"]) == set(tiny_model.state_dict())
    assert checkpoint["random_init"] == {"seed": 0, "model_type": "tiny"}

    loaded = load_model(path, "tiny", "cpu")
    assert loaded.random_seed == 0
    assert "RANDOM" in loaded.description
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name

    other_seed = write_random_checkpoint(tmp_path, "tiny", seed=1)
    other = torch.load(other_seed, weights_only=True)["model"]
    assert not torch.equal(other["sam_mask_decoder.iou_token.weight"], checkpoint["model"]["sam_mask_decoder.iou_token.weight"])


def test_official_checkpoint_without_marker_loads_as_trained(tiny_checkpoint_dir, tmp_path):
    # An official file holds only {"model": state_dict}.
    state = torch.load(tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt", weights_only=True)["model"]
    torch.save({"model": state}, tmp_path / "sam2.1_hiera_tiny.pt")
    loaded = load_model(tmp_path / "sam2.1_hiera_tiny.pt", "tiny", "cpu")
    assert loaded.random_seed is None
    assert "trained" in loaded.description


def test_checkpoint_of_another_size_is_refused(tiny_checkpoint_dir):
    with pytest.raises(WrongCheckpoint, match="does not fit SAM2.1 small"):
        load_model(tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt", "small", "cpu")


def test_not_a_checkpoint_is_refused(tmp_path):
    torch.save({"weights": {}}, tmp_path / "x.pt")
    with pytest.raises(WrongCheckpoint, match="no 'model' entry"):
        load_model(tmp_path / "x.pt", "tiny", "cpu")
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(WrongCheckpoint, match="notes.pt is not a torch checkpoint, or it is damaged"):
        load_model(tmp_path / "notes.pt", "tiny", "cpu")
    with pytest.raises(FileNotFoundError):  # not there is another matter (downloads handle it)
        load_model(tmp_path / "absent.pt", "tiny", "cpu")
    (tmp_path / "folder.pt").mkdir()  # unreadable: one line for the scripts, where it was a traceback
    with pytest.raises(CheckpointUnavailable, match="folder.pt cannot be read: Is a directory"):
        load_model(tmp_path / "folder.pt", "tiny", "cpu")


def test_the_random_checkpoint_command_replaces_random_weights_alone(trained_micro_checkpoint, tmp_path):
    """`python -m sam2serve.checkpoints models micro` wrote random weights over the committed
    trained model; now weights other than random ones are replaced only with --force."""
    def write(*arguments):
        return subprocess.run([sys.executable, "-m", "sam2serve.checkpoints", str(tmp_path), "micro", *arguments],
                              capture_output=True, text=True, timeout=300)

    target = tmp_path / trained_micro_checkpoint.name
    shutil.copy(trained_micro_checkpoint, target)
    refused = write()
    assert refused.returncode == 2 and "holds weights that are not random ones" in refused.stderr
    assert target.read_bytes() == trained_micro_checkpoint.read_bytes()
    assert write("--force").returncode == 0 and "random_init" in torch.load(target, weights_only=True)
    again = write("--seed", "1")  # random weights over random ones: the README's command run twice
    assert again.returncode == 0 and torch.load(target, weights_only=True)["random_init"]["seed"] == 1


def test_a_checkpoint_that_fails_to_save_leaves_no_file(tmp_path, monkeypatch):
    def full_disk(checkpoint, file):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_random_checkpoint(tmp_path / "random", "tiny")
    assert list((tmp_path / "random").iterdir()) == []


def test_a_numbered_cuda_device_becomes_the_current_one_before_the_model_is_built(tiny_checkpoint_dir,
                                                                                  monkeypatch):
    """cuda:1: sam2 fills tensors on "cuda" (the current device) while the model is built, so the
    device is made current first; a CPU or plain "cuda" leaves it alone. Checked without a GPU:
    the calls recorded, the build stopped."""
    import sam2serve.checkpoints as checkpoints

    calls = []

    class Built(Exception):
        pass

    def build_model(size):
        calls.append(("build", size.name))
        raise Built  # no GPU to go on with

    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("current", str(device))))
    monkeypatch.setattr(checkpoints, "build_model", build_model)
    for device in ("cuda:1", "cuda", "cpu"):
        checkpoints.make_current(device)
    assert calls == [("current", "cuda:1")]
    calls.clear()
    with pytest.raises(Built):
        checkpoints.load_model(tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt", "tiny", "cuda:1")
    assert calls == [("current", "cuda:1"), ("build", "tiny")]


def test_model_type_names():
    assert model_size("plus").filename == "sam2.1_hiera_base_plus.pt"
    assert model_size("base_plus").config == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    assert model_size("large").filename == "sam2.1_hiera_large.pt"
    with pytest.raises(ValueError, match="unknown model type"):
        model_size("huge")


@pytest.fixture
def checkpoint_site(tiny_checkpoint_dir):
    """An HTTP server of the tiny checkpoint, as the official site serves checkpoints: its URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tiny_checkpoint_dir))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_port}"
        server.shutdown()


def test_missing_checkpoint_is_downloaded(checkpoint_site, tiny_checkpoint_dir, tmp_path):
    path = ensure_checkpoint(tmp_path / "downloads", "tiny", checkpoint_site)
    assert path == tmp_path / "downloads" / "sam2.1_hiera_tiny.pt"
    assert path.read_bytes() == (tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt").read_bytes()
    assert list(path.parent.iterdir()) == [path]  # no partial file left behind
    assert path.stat().st_mode & 0o777 == 0o644  # readable by others, as `curl -o` leaves it (it was 0600)


def test_a_download_removes_partial_files_that_killed_downloads_left(checkpoint_site, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    killed = folder / "sam2.1_hiera_tiny.pt.abc123.partial"  # a download killed an hour ago
    in_progress = folder / "sam2.1_hiera_tiny.pt.def456.partial"  # another process, still writing
    other_size = folder / "sam2.1_hiera_large.pt.ghi789.partial"
    for partial in (killed, in_progress, other_size):
        partial.write_bytes(b"half a checkpoint")
    hour_ago = time.time() - 3600
    for partial in (killed, other_size):
        os.utime(partial, (hour_ago, hour_ago))
    ensure_checkpoint(folder, "tiny", checkpoint_site)
    assert not killed.exists()
    assert in_progress.exists() and other_size.exists()


class CutShort(http.server.BaseHTTPRequestHandler):
    """Announces 3 MiB, sends 1, and closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(3 << 20))
        self.end_headers()
        self.wfile.write(bytes(1 << 20))
        self.wfile.flush()
        self.connection.close()

    def log_message(self, *arguments):
        pass


def test_a_download_cut_short_leaves_no_checkpoint(tmp_path):
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), CutShort) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            with pytest.raises(CheckpointUnavailable, match="stopped after 1048576 of 3145728 bytes"):
                ensure_checkpoint(tmp_path / "downloads", "tiny", f"http://127.0.0.1:{server.server_port}")
        finally:
            server.shutdown()
    assert list((tmp_path / "downloads").iterdir()) == []  # neither a checkpoint nor a partial file


def test_offline_download_fails_with_instructions(tmp_path):
    # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(CheckpointUnavailable) as error:
        ensure_checkpoint(tmp_path, "large", "http://127.0.0.1:9/sam2")
    message = str(error.value)
    assert str(tmp_path / "sam2.1_hiera_large.pt") in message
    assert "http://127.0.0.1:9/sam2/sam2.1_hiera_large.pt" in message
    assert "curl -L -o" in message
    # Random weights in a folder of their own: beside real ones (the repository's models/, say),
    # a random file under the official name would be taken for them.
    assert message.endswith("\n    python -m sam2serve.checkpoints ~/checkpoints/random large   # then give "
                            f"~/checkpoints/random instead of {tmp_path}")
    with pytest.raises(CheckpointUnavailable, match="could not be downloaded from notaurl/sam2.1_hiera_large.pt"):
        ensure_checkpoint(tmp_path, "large", "notaurl")  # --checkpoint-url without a scheme: was a traceback


def test_a_checkpoint_file_given_for_its_folder_is_named_as_such(tmp_path):
    """The checkpoint argument is a folder: given the file itself, the message says which folder,
    rather than offering to train or download a file inside the file."""
    checkpoint = write_random_checkpoint(tmp_path, "micro", seed=0)
    with pytest.raises(CheckpointUnavailable, match=f"is a file; .* holds sam2.1_hiera_micro.pt: give {tmp_path}$"):
        ensure_checkpoint(checkpoint, "micro")
    with pytest.raises(CheckpointUnavailable, match="is a file; .* holds sam2.1_hiera_large.pt$"):
        ensure_checkpoint(checkpoint, "large", "http://127.0.0.1:9/sam2")
    # A file of a name no checkpoint has (a model trained into --output model.pt): how to name it.
    trained = checkpoint.rename(tmp_path / "model.pt")
    with pytest.raises(CheckpointUnavailable, match=re.escape(
            f"holds sam2.1_hiera_micro.pt: name the file so (mv {trained} {tmp_path}/sam2.1_hiera_micro.pt) "
            "and give its folder")):
        ensure_checkpoint(trained, "micro")
    # A folder named like the checkpoint: said so, not "not found, downloading" (nothing could replace it).
    (tmp_path / "sam2.1_hiera_large.pt").mkdir()
    with pytest.raises(CheckpointUnavailable, match="sam2.1_hiera_large.pt is not a file \\(a folder\\?\\)"):
        ensure_checkpoint(tmp_path, "large", "http://127.0.0.1:9/sam2")


def test_only_the_committed_micro_model_is_called_the_demo(tmp_path):
    """The web page calls the demo model what it is; a micro model trained again is not it,
    a copy of the committed file is."""
    committed = DEFAULT_CHECKPOINT_DIR / "sam2.1_hiera_micro.pt"
    assert load_model(committed, "micro", "cpu").weights == "demo"
    shutil.copy(committed, tmp_path / "sam2.1_hiera_micro.pt")
    assert load_model(tmp_path / "sam2.1_hiera_micro.pt", "micro", "cpu").weights == "demo"
    retrained = torch.load(committed, weights_only=True)
    retrained["model"]["sam_mask_decoder.iou_token.weight"] += 1
    torch.save(retrained, tmp_path / "retrained.pt")
    assert load_model(tmp_path / "retrained.pt", "micro", "cpu").weights == "trained"


def test_a_checkpoint_with_tensors_the_model_does_not_have_is_refused(tiny_checkpoint_dir, tmp_path):
    """Strict loading: extra tensors (another architecture's, a training wrapper's) are refused,
    as missing ones are, not silently dropped."""
    checkpoint = torch.load(tiny_checkpoint_dir / "sam2.1_hiera_tiny.pt", weights_only=True)
    checkpoint["model"]["adapter.extra.weight"] = torch.zeros(3)
    torch.save(checkpoint, tmp_path / "extra.pt")
    with pytest.raises(WrongCheckpoint, match=r"0 missing tensors .* 1 unexpected \(e.g. \['adapter.extra.weight'\]\)"):
        load_model(tmp_path / "extra.pt", "tiny", "cpu")
    del checkpoint["model"]["adapter.extra.weight"]
    del checkpoint["model"]["sam_mask_decoder.iou_token.weight"]
    torch.save(checkpoint, tmp_path / "missing.pt")
    with pytest.raises(WrongCheckpoint, match=r"1 missing tensors"):
        load_model(tmp_path / "missing.pt", "tiny", "cpu")


def test_a_written_checkpoint_is_readable_by_others(tmp_path):
    """Written through a private temporary file, the checkpoint itself is rw-r--r--."""
    path = write_random_checkpoint(tmp_path, "micro", seed=0)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_missing_micro_checkpoint_is_not_downloaded(tmp_path):
    """The micro model is the project's own: no official URL has it; the message says how to get it."""
    with pytest.raises(CheckpointUnavailable, match="The micro model is the project's own") as error:
        ensure_checkpoint(tmp_path, "micro", "http://127.0.0.1:9/sam2")
    assert "python -m training.train_micro_sam2 --output" in str(error.value)
    assert "could not be downloaded" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
