"""The fast modes against ao (their reference), on CPU, with a random-initialised micro SAM2.1
(the SAM2.1 architecture with small widths and a 512-pixel input: cheap to compile here).

Random weights give one mask per image after NMS, so the filters are off and the NMS
threshold is 1: every candidate (3 per point of an 8x8 grid, 192 per image) comes back and is
compared, matched one to one. Compiled float32 must agree with ao almost exactly; half
precision (bfloat16 on CPU) is reported and held to a floor. Exported kernels, saved and
loaded, must give the compiled model's masks, and a package built for something else is
refused. Compilation costs about a minute per mode here, so each generator is built once.
"""

import json
from dataclasses import replace

import pytest
import torch
from PIL import Image

from sam2serve.amg import AMGConfig, MaskGenerator
from sam2serve.checkpoints import load_model, write_random_checkpoint
from sam2serve.compare import compare_image, summarize
from sam2serve.fast import MANIFEST, PackageMismatch, kernel_spec, load_kernels
from sam2serve.modes import MODES, build_generator
from sam2serve.preprocess import image_to_input, image_to_input_on_device
from sam2serve.rle import rles_to_masks

from .conftest import make_scene
from .test_server import curl, run_server_expecting_exit, start_server

KEEP_EVERY_CANDIDATE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
CONFIG = AMGConfig(points_per_side=8, points_per_batch=64, **KEEP_EVERY_CANDIDATE)
# A crop layer: the image and 4 crops, 16 points each, batches of 48: every batch is short and
# padded to the static size.
CROP_CONFIG = AMGConfig(points_per_side=4, points_per_batch=48, crop_n_layers=1, **KEEP_EVERY_CANDIDATE)
SERVER_OPTIONS = ["--points-per-side", "8", "--points-per-batch", "64", "--pred-iou-thresh", "0",
                  "--stability-score-thresh", "0", "--box-nms-thresh", "1"]


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("micro"), "micro", seed=0)


@pytest.fixture(scope="module")
def load_micro(micro_checkpoint):
    """A fresh model per generator: the fast modes change the model's dtype."""
    return lambda: load_model(micro_checkpoint, "micro", "cpu")


@pytest.fixture(scope="module")
def images():
    return [make_scene(384, 448, seed=0), make_scene(301, 250, seed=1)]  # resized by the model


@pytest.fixture(scope="module")
def ao_answers(images, load_micro):
    generator = MaskGenerator(load_micro().model, CONFIG)
    return [generator.generate(image) for image in images]


@pytest.fixture(scope="module")
def fast_generator(load_micro):
    return build_generator(MODES["fast"], load_micro(), CONFIG)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, load_micro):
    """Kernels exported with --save-fast's code, and the generator that serves them."""
    directory = tmp_path_factory.mktemp("exported")
    generator = build_generator(MODES["fast"], load_micro(), CONFIG, save_fast=directory)
    return directory, generator


def compare(name: str, reference: list, candidate: list):
    """Strict and relaxed mIoU with one-to-one matching; printed with pytest -s."""
    summary = summarize([compare_image(str(i), r, c) for i, (r, c) in enumerate(zip(reference, candidate))])
    print(f"\n{name}: {summary.line()}; masks per image {[len(answer) for answer in reference]}")
    return summary


def test_preprocessing_on_device_matches_reference(images):
    for image in images:
        expected = image_to_input(image, 512)
        torch.testing.assert_close(image_to_input_on_device(image, 512, torch.device("cpu")), expected, rtol=0, atol=0)
        assert image_to_input_on_device(image, 512, torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16


def test_fast_matches_ao(fast_generator, images, ao_answers):
    assert [len(answer) for answer in ao_answers] == [192, 192]  # every candidate
    summary = compare("fast (compiled, float32) vs ao", ao_answers, [fast_generator.generate(i) for i in images])
    assert summary.mask_count_mismatch == 0
    assert summary.miou >= 0.99


def test_fast_furious_close_to_ao(images, ao_answers, load_micro):
    generator = build_generator(MODES["fast_furious"], load_micro(), CONFIG)
    assert generator.kernels.dtype == torch.bfloat16  # float16 is for CUDA
    answers = [generator.generate(image) for image in images]
    summary = compare("fast_furious (compiled, bfloat16) vs ao", ao_answers, answers)
    assert summary.relaxed_miou >= 0.85
    for answer in answers:
        masks = rles_to_masks(answer)
        assert len(masks) == 192 and masks.reshape(len(masks), -1).any(axis=1).all()  # no empty output
    features = generator.embed(images[0])
    logits, iou_preds = generator.predict_points(features, torch.tensor([[100.0, 100.0]]), images[0].shape[:2])
    assert torch.isfinite(logits).all() and torch.isfinite(iou_preds).all()


def test_short_point_batches_are_padded_to_the_static_size(images, load_micro, fast_generator):
    """Grids and crops give batches shorter than points_per_batch; padding must not change them."""
    points, hw = torch.tensor([[10.0, 20.0], [200.0, 100.0], [447.0, 383.0]]), images[0].shape[:2]
    ao = MaskGenerator(load_micro().model, CONFIG)
    with torch.inference_mode():
        expected = ao.predict_points(ao.embed(images[0]), points, hw)
        got = fast_generator.predict_points(fast_generator.embed(images[0]), points, hw)
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    reference = MaskGenerator(load_micro().model, CROP_CONFIG).generate(images[0])
    generator = build_generator(MODES["fast"], load_micro(), CROP_CONFIG)
    summary = compare("fast with crop layers, padded batches, vs ao", [reference], [generator.generate(images[0])])
    assert summary.mask_count_mismatch == 0 and summary.miou >= 0.99


def test_saved_then_loaded_kernels_give_the_compiled_masks(exported, fast_generator, images):
    directory, loaded_generator = exported
    assert sorted(p.name for p in directory.iterdir()) == sorted([MANIFEST, "image_encoder.pt2", "point_decoder.pt2"])
    compiled = [fast_generator.generate(image) for image in images]
    summary = compare("fast exported+loaded vs fast compiled", compiled, [loaded_generator.generate(i) for i in images])
    assert summary.mask_count_mismatch == 0 and summary.miou >= 0.999


def test_mismatched_package_is_refused(exported, load_micro, tmp_path):
    directory, _ = exported
    loaded = load_micro()
    spec = kernel_spec(loaded.model, loaded.path, CONFIG, furious=False)
    assert load_kernels(directory, spec).spec == spec
    other_checkpoint = write_random_checkpoint(tmp_path, "micro", seed=3)
    for other, word in [
        (replace(spec, points_per_batch=1024), "points_per_batch"),
        (kernel_spec(loaded.model, loaded.path, CONFIG, furious=True), "dtype"),
        (kernel_spec(loaded.model, other_checkpoint, CONFIG, furious=False), "checkpoint"),
        (replace(spec, torch_version="1.0"), "torch_version"),
    ]:
        with pytest.raises(PackageMismatch, match=word):
            load_kernels(directory, other)
    with pytest.raises(PackageMismatch, match="no manifest.json"):
        load_kernels(tmp_path, spec)


def test_server_loads_exported_kernels(exported, micro_checkpoint, tmp_path):
    directory, loaded_generator = exported
    image = make_scene(150, 180, seed=2)  # within the test servers' pixel limit
    Image.fromarray(image).save(tmp_path / "scene.png")
    model = [str(micro_checkpoint.parent), "micro"]
    process, url = start_server(*model, "--fast", "--load-fast", str(directory), *SERVER_OPTIONS,
                                log_path=tmp_path / "server.log")
    try:
        status, body = curl("-X", "POST", url + "/upload_rle", "-F", f"image=@{tmp_path / 'scene.png'}")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert status == 200
    assert list(json.loads(body).values()) == loaded_generator.generate(image)
    assert "loaded exported kernels" in (tmp_path / "server.log").read_text()

    # Another points-per-batch than the package was built for: a clear refusal, no traceback.
    result = run_server_expecting_exit(*model, "--fast", "--load-fast", str(directory), *SERVER_OPTIONS[:2])
    assert "built for something else" in result.stderr and "points_per_batch" in result.stderr
    assert "Traceback" not in result.stderr

