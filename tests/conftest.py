"""Shared fixtures: a deterministic random-initialised tiny SAM2.1 and synthetic scenes.

Random weights are nearly degenerate (every point prompt gives about the same near-full-image
mask), so tests that need several masks lower the thresholds and say so.
"""

import resource
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sam2serve.checkpoints import DEFAULT_CHECKPOINT_DIR, MODEL_SIZES, build_random_model, write_random_checkpoint
from sam2serve.model import ImageEncoder
from sam2serve.preprocess import image_to_input
from training.scenes import make_scene as make_generated_scene

# The tests compile many generators in one process (a server compiles one): each is another
# entry in torch.compile's cache of the same code objects, over its default limit of 8.
torch._dynamo.config.recompile_limit = 64
# Some tests crash a child process on purpose (a loader that segfaults): no core file, where a
# machine would write one into the working folder.
resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def make_scene(height: int, width: int, seed: int, shapes: int = 6) -> np.ndarray:
    """A photo-like RGB image: a colour gradient, filled ellipses and rectangles, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    gradient = np.stack([xx / width * 200, yy / height * 150, np.full((height, width), 90.0)], -1)
    image = Image.fromarray(gradient.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(shapes):
        size = int(rng.integers(min(height, width) // 8, min(height, width) // 3))
        x0, y0 = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + size, y0 + size], fill=colour)
    noisy = np.asarray(image) + rng.normal(0, 6, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def native_threads_added(imports: str, setup: str) -> int:
    """Runs the Python code `imports`, then `setup`, in a process of its own, from the checkout,
    with torch on 2 threads, and answers how many threads `setup` started that Python did not:
    OpenMP's pool workers, one for each thread that did parallel torch work (worker.py, "Which
    thread"). Imports come before the count: SciPy's OpenBLAS starts a thread as it loads. The
    count is the least of a few reads: a thread that Python has let go of (a ThreadPoolExecutor's,
    once the executor is collected) leaves threading.enumerate() a moment before it ends."""
    script = f"""
import os, threading, time, torch
torch.set_num_threads(2)
{imports}
def native_threads():
    reads = []
    for _ in range(10):
        reads.append(len(os.listdir("/proc/self/task")) - len(threading.enumerate()))
        time.sleep(0.05)
    return min(reads)
before = native_threads()
{setup}
print(native_threads() - before)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


counts_native_threads = pytest.mark.skipif(not Path("/proc/self/task").is_dir(),
                                           reason="counts its threads in Linux's /proc")


def features_and_points(model, n_points: int, seed: int = 0):
    """A generated scene's image features (image_embed, feat_s0, feat_s1) and random points in
    the model's input frame: the decoder's inputs."""
    image = make_generated_scene(np.random.default_rng(seed), 240, 320, min_objects=6, max_objects=10).image
    with torch.inference_mode():
        features = ImageEncoder(model)(image_to_input(image, model.image_size))
    coords = torch.rand((n_points, 2), generator=torch.Generator().manual_seed(seed)) * model.image_size
    return (*features, coords)


@pytest.fixture(scope="session")
def tiny_model():
    return build_random_model(MODEL_SIZES["tiny"], seed=0)


@pytest.fixture(scope="session")
def trained_micro_checkpoint():
    """The project's trained micro SAM2.1, committed in models/: realistic masks."""
    path = DEFAULT_CHECKPOINT_DIR / MODEL_SIZES["micro"].filename
    assert path.is_file(), f"{path} is missing: it is committed; python -m training.train_micro_sam2 writes it again"
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpoints")
    write_random_checkpoint(directory, "tiny", seed=0)
    return directory


@pytest.fixture(scope="session")
def scene():
    # Odd, non-square size: exercises resizing and column-major RLE on uneven shapes.
    return make_scene(123, 157, seed=0)


@pytest.fixture(autouse=True)
def threads_left_running_are_daemons():
    """A thread that a test starts and leaves running must be a daemon: one left waiting (for an
    answer a failed test's stub never lets through) held pytest's exit for its timeout, minutes
    after the report. Not counted: the idle workers of a thread pool (torch.compile keeps one),
    which Python wakes and ends at exit."""
    before = set(threading.enumerate())
    yield
    left = [thread.name for thread in threading.enumerate()
            if thread not in before and not thread.daemon and not thread.name.startswith("ThreadPoolExecutor-")]
    assert not left, f"threads left running, not daemons: {left}; start them with daemon=True, or join them"
