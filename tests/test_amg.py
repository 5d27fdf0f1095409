"""The project's mask generator ("ao") against the sam2 package's (the baseline).

Random weights make final masks nearly degenerate, so besides final masks these tests compare
what comes before NMS, per point and per candidate mask: image features, decoder logits,
predicted IoUs, stability scores, boxes and candidate masks. Where a test needs masks to
survive, it lowers the thresholds (and the stability offset, since random logits stay within
about +-1) and says so. The project's trained micro model gives 10 or more real masks (under sam2's
default thresholds): there ao must give the baseline's masks, in the same
order, to float rounding (ao's decoder adds and multiplies in another order, so a pixel whose
logit lies within about 1e-6 of the threshold may flip).
"""

import logging
import math
import re
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from sam2.sam2_image_predictor import SAM2ImagePredictor

from sam2.utils.amg import batched_mask_to_box, calculate_stability_score

from sam2serve import upscale
from sam2serve.amg import (
    AMGConfig, Interrupted, MaskGenerator, ReferenceMaskGenerator, boxes_of_logits, eager_kernels,
    fit_predictor_to_model, full_resolution_scores, small_regions,
)
from sam2serve.checkpoints import load_model
from sam2serve.model import FactoredPointDecoder, default_prompts_per_step
from sam2serve.rle import rles_to_masks
from training.scenes import make_scene as make_generated_scene


def assert_same_masks(ours: list[dict], reference: list[dict], min_iou: float = 0.999) -> None:
    """Same mask count, and each mask's IoU with the reference's at the same rank >= min_iou."""
    assert len(ours) == len(reference)
    if not ours:
        return
    h, w = reference[0]["size"]
    ours_rles, reference_rles = mask_utils.frPyObjects(ours, h, w), mask_utils.frPyObjects(reference, h, w)
    ious = np.diag(mask_utils.iou(ours_rles, reference_rles, [0] * len(ours))).copy()
    ious[(mask_utils.area(ours_rles) == 0) & (mask_utils.area(reference_rles) == 0)] = 1.0  # pycocotools says 0
    assert ious.min() >= min_iou


def test_image_features_match_predictor(tiny_model, scene):
    predictor = SAM2ImagePredictor(tiny_model)
    predictor.set_image(scene)
    features = MaskGenerator(tiny_model, AMGConfig()).embed(scene)
    torch.testing.assert_close(features.image_embed, predictor._features["image_embed"], rtol=0, atol=1e-6)
    for ours, theirs in zip(features.high_res_feats, predictor._features["high_res_feats"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("multimask_output", [True, False])
def test_decoder_outputs_match_predictor(tiny_model, scene, multimask_output):
    h, w = scene.shape[:2]
    # No IoU filter, so that ao's decoder computes every mask (with one, it skips prompts whose
    # every mask fails it: tests/test_decoder.py).
    config = AMGConfig(points_per_side=3, multimask_output=multimask_output, pred_iou_thresh=0.0)
    generator = MaskGenerator(tiny_model, config)
    points = torch.as_tensor(generator.point_grids[0] * np.array([w, h]), dtype=torch.float32)
    with torch.inference_mode():
        low_res, iou_preds = generator.predict_points(generator.embed(scene), points, (h, w))

    predictor = SAM2ImagePredictor(tiny_model)
    predictor.set_image(scene)
    in_points = predictor._transforms.transform_coords(points, normalize=True, orig_hw=(h, w))
    labels = torch.ones(len(points), dtype=torch.int)
    with torch.no_grad():
        _, expected_iou, expected_low_res = predictor._predict(
            in_points[:, None, :], labels[:, None], multimask_output=multimask_output, return_logits=True
        )
    assert low_res.shape == (9, 3 if multimask_output else 1, 256, 256)
    torch.testing.assert_close(iou_preds, expected_iou, rtol=0, atol=1e-6)
    # sam2 returns its low-resolution logits clamped to +-32.
    torch.testing.assert_close(low_res.clamp(-32, 32), expected_low_res, rtol=0, atol=1e-5)


# Thresholds that split random-weight candidates: predicted IoUs lie around 0.47-0.55 and, with
# a stability offset of 0.05, stability scores around 0.2-0.85.
CANDIDATE_CONFIGS = {
    "keep_all": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0),
    "iou_filter": dict(pred_iou_thresh=0.51, stability_score_thresh=0.0),
    "stability_filter": dict(pred_iou_thresh=0.0, stability_score_thresh=0.5),
    "both_filters": dict(pred_iou_thresh=0.5, stability_score_thresh=0.5),
}


@pytest.mark.parametrize("name", sorted(CANDIDATE_CONFIGS))
def test_candidates_before_nms_match_baseline(tiny_model, scene, name):
    """Per batch of points: the same masks survive the filters, with the same scores and boxes."""
    config = AMGConfig(points_per_side=4, points_per_batch=10, stability_score_offset=0.05,
                       **CANDIDATE_CONFIGS[name])
    h, w = scene.shape[:2]
    crop_box = [0, 0, w, h]
    ours = MaskGenerator(tiny_model, config)
    reference = ReferenceMaskGenerator(tiny_model, config).generator
    reference.predictor.set_image(scene)
    points = ours.point_grids[0] * np.array([w, h])
    total_candidates, total_kept = 0, 0
    with torch.inference_mode():
        features = ours.embed(scene)
        for start in range(0, len(points), config.points_per_batch):
            batch = points[start : start + config.points_per_batch]
            candidates = ours.batch_candidates(features, batch, crop_box, (h, w), (h, w))
            expected = reference._process_batch(batch, (h, w), crop_box, (h, w), normalize=True)
            torch.testing.assert_close(candidates.iou_preds, expected["iou_preds"], rtol=0, atol=1e-6)
            # ao's decoder rounds differently (tests/test_decoder.py): a pixel whose logit lies
            # within about 1e-6 of a threshold may flip, moving a stability score by 1/area.
            torch.testing.assert_close(candidates.stability_scores, expected["stability_score"], rtol=0, atol=1e-4)
            torch.testing.assert_close(candidates.boxes, expected["boxes"], rtol=0, atol=1)
            torch.testing.assert_close(candidates.points, expected["points"])
            masks = ours.render_masks(candidates, [crop_box], (h, w)).numpy()
            expected_masks = rles_to_masks(expected["rles"]).reshape(masks.shape)
            differing = (masks != expected_masks).reshape(len(masks), -1).mean(axis=1)
            assert differing.max(initial=0) <= 1e-4
            total_candidates += 3 * len(batch)
            total_kept += len(candidates)
    # The configuration must exercise what it names: all kept, or some kept and some dropped.
    if name == "keep_all":
        assert total_kept == total_candidates
    else:
        assert 0 < total_kept < total_candidates


FINAL_CONFIGS = {
    # The defaults: random weights give no mask at all, on both sides.
    "defaults": dict(points_per_side=4),
    # Thresholds at 0: one mask survives NMS, as measured for random weights.
    "no_filters": dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0),
    # NMS threshold 1 keeps every candidate: tests order and RLE of 48 masks, with a last
    # point batch that is smaller than the others.
    "keep_every_candidate": dict(points_per_side=4, points_per_batch=6, pred_iou_thresh=0.0,
                                 stability_score_thresh=0.0, box_nms_thresh=1.0),
    "filters_split": dict(points_per_side=4, stability_score_offset=0.05, pred_iou_thresh=0.5,
                          stability_score_thresh=0.5, box_nms_thresh=1.0),
    # One layer of crops (4 crops + the image), crop NMS between them.
    "crop_layer": dict(points_per_side=2, crop_n_layers=1, pred_iou_thresh=0.0,
                       stability_score_thresh=0.0, box_nms_thresh=1.0),
    # Crops, none keeping a mask: sam2's generator failed there (an IndexError) until its empty
    # crops' boxes were shaped (amg.with_crop_boxes_shaped).
    "crops_keep_nothing": dict(points_per_side=2, crop_n_layers=1, pred_iou_thresh=1.0),
}


@pytest.mark.parametrize("name", sorted(FINAL_CONFIGS))
def test_final_masks_match_baseline(tiny_model, scene, name):
    config = AMGConfig(**FINAL_CONFIGS[name])
    ours = MaskGenerator(tiny_model, config).generate(scene)
    reference = ReferenceMaskGenerator(tiny_model, config).generate(scene)
    assert_same_masks(ours, reference)
    if name == "keep_every_candidate":
        assert len(ours) == 48
    if name in ("no_filters", "filters_split", "crop_layer"):
        assert len(ours) >= 1
    if name == "crops_keep_nothing":
        assert ours == reference == []
    for rle in ours:
        assert rle["size"] == list(scene.shape[:2])


@pytest.mark.parametrize("height, width", [(5, 300), (2, 2)])
def test_crops_without_pixels_give_no_masks_and_the_other_crops_theirs(trained_micro_checkpoint, height, width):
    """Crop layers of an image a few pixels high or wide include crops of no pixel, on which
    sam2's generator failed (a resize to 0 pixels: a 500 for such an image on a server with
    --crop-n-layers); such a crop now keeps no mask, in the baseline and in ao alike."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    scene = make_generated_scene(np.random.default_rng(2005), 120, 300, min_objects=4, max_objects=6).image
    image = np.ascontiguousarray(scene[50:50 + height, :width])
    config = AMGConfig(points_per_side=4, crop_n_layers=2, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                       box_nms_thresh=1.0)
    sam2s = SAM2AutomaticMaskGenerator(model, **vars(config), output_mode="uncompressed_rle")
    fit_predictor_to_model(sam2s.predictor)  # (the micro model's input is 256 pixels)
    with pytest.raises(RuntimeError, match="TorchScript"):  # sam2's own, as it is
        sam2s.generate(image)
    reference = rles_to_masks(ReferenceMaskGenerator(model, config).generate(image))
    ours = rles_to_masks(MaskGenerator(model, config).generate(image))
    assert len(reference) >= 1 and ours.shape == reference.shape  # (pycocotools' IoU fails on masks of 4 pixels)
    assert (ours != reference).any(axis=(1, 2)).mean() <= 0.01  # masks that differ: a last float bit at most


def test_boxes_of_logits_equal_sam2s_boxes_of_masks():
    logits = torch.randn(6, 40, 50) - 2.5  # sparse masks: a few scattered pixels above 0
    logits[1] = -1.0  # empty
    logits[2] = 1.0  # full
    logits[3, 7:9, 11:30] = 3.0  # one block
    logits[4, 39, 49] = 0.5  # the last pixel only
    expected = batched_mask_to_box(logits > 0)
    assert torch.equal(boxes_of_logits(logits, 0.0), expected)
    assert expected[1].tolist() == [0, 0, 0, 0] and expected[2].tolist() == [0, 0, 49, 39]


@pytest.mark.parametrize("bad", [dict(points_per_side=0), dict(points_per_batch=0),
                                 dict(stability_score_thresh=1.5), dict(box_nms_thresh=-0.1),
                                 dict(crop_n_layers=-1), dict(pred_iou_thresh=float("nan")),
                                 dict(stability_score_offset=float("inf")), dict(mask_threshold=float("nan")),
                                 dict(crop_overlap_ratio=1.0), dict(points_per_side=1025),
                                 dict(points_per_batch=1024**2 + 1),
                                 dict(crop_n_layers=5),  # 50 built crop boxes until memory ran out
                                 dict(pred_iou_thresh=1.01), dict(pred_iou_thresh=-0.5),  # kept no mask / all
                                 # stability scores above 1, or 0/0 (NaN in the JSON of ?format=coco)
                                 dict(stability_score_offset=0.0), dict(stability_score_offset=-1.0),
                                 dict(stability_score_offset=1e300)])
def test_config_rejects_nonsense(bad):
    with pytest.raises(ValueError):
        AMGConfig(**bad)
    AMGConfig(crop_n_layers=4, pred_iou_thresh=1.0, points_per_batch=1024**2)


def test_config_rejects_settings_of_another_type():
    """A library caller's "false" for use_m2m turned m2m on, 2.5 points a side were taken; numpy's
    numbers are numbers, and a whole number is a number."""
    for bad, words in [(dict(use_m2m="false"), "use_m2m must be True or False, got 'false'"),
                       (dict(use_m2m=1), "use_m2m must be True or False"),
                       (dict(points_per_side=2.5), "points_per_side must be a whole number, got 2.5"),
                       (dict(points_per_side=True), "points_per_side must be a whole number, got True"),
                       (dict(pred_iou_thresh="0.5"), "pred_iou_thresh must be a number, got '0.5'")]:
        with pytest.raises(TypeError, match=words):
            AMGConfig(**bad)
    AMGConfig(points_per_side=np.int64(4), pred_iou_thresh=1, use_m2m=np.bool_(True),
              crop_overlap_ratio=np.float32(0.3))


def test_the_baseline_cuts_its_points_per_batch_on_large_images_to_the_same_masks(trained_micro_checkpoint,
                                                                                monkeypatch, caplog):
    """sam2's generator upscales each point's masks to the image: its batch of 64 asked for 9 GB
    on a 12 MP photo. Points per batch are cut to REFERENCE_BATCH_BYTES there; the masks are the
    same, each point decoded on its own."""
    from sam2serve import amg

    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    image = make_generated_scene(np.random.default_rng(2002), 120, 160, min_objects=4, max_objects=6).image
    config = AMGConfig(points_per_side=8, points_per_batch=64)
    whole = ReferenceMaskGenerator(model, config)
    expected = whole.generate(image)
    assert whole.generator.points_per_batch == 64 and len(expected) >= 3
    monkeypatch.setattr(amg, "REFERENCE_BATCH_BYTES", 10 * amg.REFERENCE_BYTES_PER_POINT_PIXEL * 120 * 160)
    batches = []
    cut = ReferenceMaskGenerator(model, config)
    original = cut.generator._process_batch
    cut.generator._process_batch = lambda points, *rest, **options: batches.append(len(points)) or original(
        points, *rest, **options)
    with caplog.at_level(logging.INFO, logger="sam2serve.amg"):
        assert cut.generate(image) == expected
    assert cut.generator.points_per_batch == 10 and batches == [10] * 6 + [4]  # 64 points
    assert "baseline: 10 points per batch instead of 64 on this 160x120 image" in caplog.text


@pytest.mark.parametrize("crop_n_layers", [0, 1])
def test_trained_model_ao_equals_baseline_with_tens_of_masks(trained_micro_checkpoint, crop_n_layers):
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    # sam2's defaults (32x32 grid, its thresholds); with crops a 16x16 grid on each, a fifth of the points
    config = AMGConfig(crop_n_layers=crop_n_layers, points_per_side=32 if crop_n_layers == 0 else 16)
    for seed in (2002, 2004):  # 11 and 13 objects: 28 and 21 masks without crops, 34 and 27 with
        image = make_generated_scene(np.random.default_rng(seed), 300, 380, min_objects=8, max_objects=14).image
        ours = MaskGenerator(model, config).generate(image)
        reference = ReferenceMaskGenerator(model, config).generate(image)
        assert len(reference) >= 10  # a realistic number of masks, not the random model's 0 or 1
        assert_same_masks(ours, reference, min_iou=0.999)


@pytest.mark.parametrize("crop_n_layers", [0, 1])
@pytest.mark.parametrize("generator_class", [MaskGenerator, ReferenceMaskGenerator])
def test_should_stop_is_asked_before_each_crop_and_batch_of_point_prompts(
        trained_micro_checkpoint, generator_class, crop_n_layers):
    """What lets the server stop making masks nobody waits for any more; asked and answered
    False, it changes nothing. ao asks too before each chunk of the masks it renders (thousands,
    under loose filters)."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    config = AMGConfig(points_per_side=4, points_per_batch=4, crop_n_layers=crop_n_layers)  # 4 batches a crop
    generator = generator_class(model, config)
    image = make_generated_scene(np.random.default_rng(2002), 120, 160, min_objects=4, max_objects=6).image
    expected, asked = generator.generate(image), []
    stop_at = 6 if crop_n_layers else 3  # the second crop, before its encoding; a batch of the whole image
    generator.should_stop = lambda: asked.append(1) or len(asked) == stop_at
    with pytest.raises(Interrupted):
        generator.generate(image)
    assert len(asked) == stop_at
    asked.clear()
    generator.should_stop = lambda: asked.append(1) or False
    crops = 5 if crop_n_layers else 1
    chunks = math.ceil(len(expected) / 4) if generator_class is MaskGenerator else 0  # rendered 4 at a time
    assert expected and generator.generate(image) == expected and len(asked) == crops * (1 + 4) + chunks
    if generator_class is MaskGenerator:  # stopped while its masks are rendered
        asked.clear()
        generator.should_stop = lambda: asked.append(1) or len(asked) == crops * (1 + 4) + 1
        with pytest.raises(Interrupted):
            generator.generate(image)


M2M_FILTERS = {
    "sam2": {},
    "off": dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0),
    # The IoU filter alone reads the refined masks' IoU: a prompt whose first masks all fail it
    # may pass once refined (ao computes every mask then, gating none).
    "iou only": dict(pred_iou_thresh=0.8, stability_score_thresh=0.0, box_nms_thresh=1.0),
}


@pytest.mark.parametrize("filters", M2M_FILTERS)
def test_m2m_refinement_equals_baselines(trained_micro_checkpoint, filters):
    """use_m2m: every mask refined once more with its own logits as mask input, as sam2 does;
    the refinement changes the answer, and ao's equals the baseline's."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    off = M2M_FILTERS[filters]
    config = AMGConfig(points_per_side=8, use_m2m=True, **off)
    image = make_generated_scene(np.random.default_rng(2002), 200, 260, min_objects=8, max_objects=14).image
    reference = ReferenceMaskGenerator(model, config).generate(image)
    assert_same_masks(MaskGenerator(model, config).generate(image), reference, min_iou=0.999)
    assert reference != ReferenceMaskGenerator(model, AMGConfig(points_per_side=8, **off)).generate(image)
    if filters == "iou only":  # the scene has prompts that pass only once refined: gating them changes the masks
        kernels = eager_kernels(model, config)
        gated = FactoredPointDecoder(model, True, default_prompts_per_step(model), iou_gate=config.pred_iou_thresh)
        assert MaskGenerator(model, config, replace(kernels, decoder=gated)).generate(image) != reference


def connected_components_by_propagation(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent stand-in for sam2's CUDA connected components ((N, 1, H, W) -> labels and
    each pixel's region area, 0 off the mask): every mask pixel takes the largest index among its
    8 neighbours until nothing changes."""
    mask = mask.bool()
    h, w = mask.shape[-2:]
    index = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w) * mask
    while not torch.equal(grown := torch.nn.functional.max_pool2d(index, 3, stride=1, padding=1) * mask, index):
        index = grown
    labels = index.long()
    areas = torch.stack([counts[inverse] for _, inverse, counts in (m.unique(return_inverse=True, return_counts=True) for m in labels)])
    return labels, areas * mask


@pytest.mark.parametrize("use_m2m, mask_threshold", [(False, 0.0), (True, 0.0), (False, -2.0)])
def test_min_mask_region_area_equals_baseline(trained_micro_checkpoint, monkeypatch, use_m2m, mask_threshold):
    """min_mask_region_area: sam2 fills holes and removes specks in the low-resolution masks with
    its CUDA extension (absent here, so sam2 would skip the step); with a CPU stand-in for that
    extension, the baseline's answer changes and ao's equals it. sam2 finds them at its
    predictor's threshold, 0, whatever the generator's mask_threshold (ao used the latter)."""
    import sam2.utils.misc

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", connected_components_by_propagation)
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    image = make_generated_scene(np.random.default_rng(2004), 200, 260, min_objects=8, max_objects=14).image
    config = AMGConfig(points_per_side=8, min_mask_region_area=40, use_m2m=use_m2m, stability_score_thresh=0.9,
                       mask_threshold=mask_threshold)
    reference = ReferenceMaskGenerator(model, config).generate(image)
    assert len(reference) >= 5
    assert_same_masks(MaskGenerator(model, config).generate(image), reference, min_iou=0.999)
    without = ReferenceMaskGenerator(model, replace(config, min_mask_region_area=0)).generate(image)
    assert reference != without


def test_a_requests_settings_keep_the_generator_and_its_warning_once(tiny_model, caplog, monkeypatch):
    """with_settings: only the filters a request may change, on the same model; the baseline's
    warning that sam2 skips min_mask_region_area (without its CUDA extension) is the server's,
    said when it starts, not again for each request with settings of its own."""
    from sam2serve import amg
    from sam2serve.amg import with_settings

    monkeypatch.setattr(amg, "baseline_leaves_out", lambda config: config.min_mask_region_area and "it skips that")
    config = AMGConfig(points_per_side=4, min_mask_region_area=10)
    with caplog.at_level("WARNING", logger="sam2serve.amg"):
        baseline = ReferenceMaskGenerator(tiny_model, config)
        variant = with_settings(baseline, {"pred_iou_thresh": 0.5})
    assert [record.getMessage() for record in caplog.records] == [
        "baseline: it skips that; ao and the fast modes apply it on every device"]
    assert variant.config == replace(config, pred_iou_thresh=0.5) and baseline.config == config
    assert variant.generator.predictor.model is tiny_model
    assert with_settings(baseline, {}) is baseline
    with pytest.raises(ValueError, match="not settings a request may change: \\['points_per_side'\\]"):
        with_settings(MaskGenerator(tiny_model, config), {"points_per_side": 8})


def test_a_stability_threshold_of_one_keeps_perfectly_stable_masks(tiny_model):
    """sam2 keeps stability >= its threshold: at 1.0 the masks whose every pixel lies beyond the
    offset (stability exactly 1) stay. The decoder is replaced by fixed logits."""
    config = AMGConfig(points_per_side=2, pred_iou_thresh=0.0, stability_score_thresh=1.0)
    generator = MaskGenerator(tiny_model, config)
    logits = torch.full((2, 3, 256, 256), 20.0)  # point 0: three full masks, stability 1
    logits[1] = 0.5  # point 1: three masks within the offset, stability 0
    generator.predict_points = lambda features, points, crop_hw: (logits[: len(points)], torch.full((len(points), 3), 0.9))
    h, w = 100, 200
    candidates = generator.batch_candidates(None, np.array([[10.0, 10.0], [150.0, 80.0]]), [0, 0, w, h], (h, w), (h, w))
    assert len(candidates) == 3
    assert candidates.stability_scores.tolist() == [1.0, 1.0, 1.0]
    assert candidates.points.tolist() == [[10.0, 10.0]] * 3


def test_a_predicted_iou_equal_to_the_threshold_fails_it(tiny_model):
    """sam2 keeps predicted IoU > pred_iou_thresh, strictly (the factored decoder's gate too)."""
    config = AMGConfig(points_per_side=2, pred_iou_thresh=0.5, stability_score_thresh=0.0)
    generator = MaskGenerator(tiny_model, config)
    logits = torch.full((2, 3, 256, 256), 20.0)
    ious = torch.tensor([[0.5, 0.75, 0.5], [0.5, 0.5, 0.5]])
    generator.predict_points = lambda features, points, crop_hw: (logits[: len(points)], ious[: len(points)])
    h, w = 100, 200
    candidates = generator.batch_candidates(None, np.array([[10.0, 10.0], [150.0, 80.0]]), [0, 0, w, h], (h, w), (h, w))
    assert candidates.iou_preds.tolist() == [0.75]


def test_mask_threshold_is_the_baselines_for_the_masks_too(tiny_model, scene):
    """mask_threshold applies to the rendered masks as to scores and boxes (48 candidates kept)."""
    keep_all = dict(points_per_side=4, points_per_batch=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    box_nms_thresh=1.0)
    config = AMGConfig(mask_threshold=0.4, **keep_all)
    ours = MaskGenerator(tiny_model, config).generate(scene)
    reference = ReferenceMaskGenerator(tiny_model, config).generate(scene)
    assert len(ours) == 48 and sum(rles_to_masks(ours).reshape(48, -1).any(axis=1)) >= 10  # masks not all empty
    assert_same_masks(ours, reference)
    assert ours != MaskGenerator(tiny_model, AMGConfig(**keep_all)).generate(scene)  # the threshold matters


def test_single_mask_output_with_the_iou_filter_equals_the_baseline(tiny_model, scene):
    """multimask_output=False under an IoU filter (sam2's default thresholds are on): the decoder
    gates prompts only for multimask output."""
    config = AMGConfig(points_per_side=4, multimask_output=False, pred_iou_thresh=0.54, stability_score_thresh=0.0,
                       box_nms_thresh=1.0)
    ours = MaskGenerator(tiny_model, config).generate(scene)
    reference = ReferenceMaskGenerator(tiny_model, config).generate(scene)
    assert 0 < len(reference) < 16
    assert_same_masks(ours, reference)


def test_records_of_masks_from_crops_equal_sam2s(trained_micro_checkpoint):
    """annotate(): crop_box in XYWH and point_coords in image pixels, for masks of every crop."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    config = AMGConfig(points_per_side=4, crop_n_layers=1)
    image = make_generated_scene(np.random.default_rng(2002), 150, 190, min_objects=4, max_objects=6).image
    ours = MaskGenerator(model, config).annotate(image)
    reference = ReferenceMaskGenerator(model, config).annotate(image)
    assert len(ours) == len(reference) > 0
    whole = [0, 0, 190, 150]
    assert any(record["crop_box"] != whole for record in reference)  # masks of crops are among them
    for mine, theirs in zip(ours, reference):
        assert mine["crop_box"] == theirs["crop_box"]
        assert mine["bbox"] == theirs["bbox"]
        np.testing.assert_allclose(mine["point_coords"], theirs["point_coords"], atol=1e-4)
        # Of sam2's types too (floats: ?format=coco's crop_box read 0 in ao, 0.0 in the baseline)
        assert {key: type(value) for key, value in mine.items()} == {key: type(value) for key, value in theirs.items()}
        assert [type(value) for value in mine["crop_box"] + mine["bbox"]] == [float] * 8


def test_generators_take_the_images_sam2_takes_and_refuse_others_in_words(trained_micro_checkpoint):
    """(H, W, 3) uint8 RGB, in a list or any iterable, or none. A float image was read as [0, 1]
    by the eager kernels and as [0, 255] by the compiled ones (other masks, without a word); gray,
    RGBA or channels first failed deep in torch; an iterator gave no masks; an empty list failed;
    a view with negative strides failed in torch; an image of no pixels failed deep in torch (ao)
    or sam2 (the baseline)."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    config = AMGConfig(points_per_side=2)
    image = make_generated_scene(np.random.default_rng(2002), 60, 80, min_objects=2, max_objects=3).image
    for generator in (MaskGenerator(model, config), ReferenceMaskGenerator(model, config)):
        assert generator.generate_batch([]) == [] and generator.annotate_batch([]) == []
        assert generator.generate_batch(iter([image, image])) == [generator.generate(image)] * 2
        # A view in reverse, as BGR[..., ::-1] from OpenCV gives (torch takes no negative strides)
        assert generator.generate(image[..., ::-1].copy()[..., ::-1]) == generator.generate(image)
        for bad, words in [(image / 255, "got an array of float64 of shape (60, 80, 3)"),
                           (image[..., 0], "shape (60, 80)"), (np.dstack([image, image[..., :1]]), "(60, 80, 4)"),
                           (image.transpose(2, 0, 1), "(3, 60, 80)"), (image.tolist(), "got list")]:
            with pytest.raises(TypeError, match=re.escape(words)):
                generator.generate(bad)
        with pytest.raises(TypeError, match="expected a list of images"):
            generator.generate_batch(image)
        for empty in (image[:0], image[:, :0]):
            with pytest.raises(ValueError, match=re.escape(f"an image of no pixels (shape {empty.shape})")):
                generator.generate(empty)


def test_the_baseline_shared_by_threads_gives_each_its_own_masks(trained_micro_checkpoint):
    """sam2's generator keeps its image's features between its steps: two threads' images in
    one gave one thread the other's masks."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    generator = ReferenceMaskGenerator(model, AMGConfig(points_per_side=2))
    images = [make_generated_scene(np.random.default_rng(seed), 60 + seed, 80, min_objects=2, max_objects=3).image
              for seed in (1, 2)]
    expected = [generator.generate(image) for image in images]
    answers = [[], []]

    def segment(which: int) -> None:
        for _ in range(4):
            answers[which].append(generator.generate(images[which]))

    threads = [threading.Thread(target=segment, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == [[expected[0]] * 4, [expected[1]] * 4]


def test_regions_of_exactly_min_mask_region_area_are_removed():
    """sam2 fills holes and removes specks of area <= min_mask_region_area."""
    masks = np.zeros((2, 8, 8), bool)
    masks[0, 1:3, 1:3] = True  # 4 pixels
    masks[0, 5:8, 5:8] = True  # 9 pixels
    masks[1, 0, 0] = True  # 1 pixel, in another mask: not joined with mask 0's
    small = small_regions(masks, 4)
    assert small[0].sum() == 4 and small[0, 1:3, 1:3].all()
    assert small[1, 0, 0] and small[1].sum() == 1
    assert not small_regions(masks, 3)[0].any()


@pytest.mark.parametrize("bad", [dict(min_mask_region_area=-1), dict(crop_n_points_downscale_factor=0),
                                 dict(crop_nms_thresh=1.5), dict(crop_overlap_ratio=-0.1),
                                 # crop layer 2's grid: int(8 / 3**2) = 0 points (sam2 divides by zero)
                                 dict(points_per_side=8, crop_n_layers=2, crop_n_points_downscale_factor=3)])
def test_config_rejects_more_nonsense(bad):
    with pytest.raises(ValueError):
        AMGConfig(**bad)
    AMGConfig(points_per_side=1024, crop_overlap_ratio=0.0, min_mask_region_area=0)  # the limits themselves
    AMGConfig(points_per_side=9, crop_n_layers=2, crop_n_points_downscale_factor=3)  # layer 2: 1 point a side


def test_full_resolution_scores_use_the_configs_offset_and_threshold_on_both_paths():
    """The micro model's 64x64 logits on a CPU take the cell-by-cell path for images of 65536
    pixels and more (upscale.use_cells), the reference below: a request's stability_score_offset
    and the config's mask_threshold must reach both."""
    generator = torch.Generator().manual_seed(0)
    blobs = torch.nn.functional.interpolate(torch.randn(4, 1, 8, 8, generator=generator) * 4, (64, 64), mode="bicubic")[:, 0]
    logits = blobs + 0.3 * torch.randn(4, 64, 64, generator=generator)
    for size in ((300, 400), (100, 120)):
        assert upscale.use_cells(logits, size) == (size == (300, 400))
        upscaled = upscale.upscale_logits(logits, size)
        for threshold, offset in ((0.0, 0.05), (0.0, 1.0), (0.25, 2.0)):
            stability, boxes = full_resolution_scores(logits, size, AMGConfig(mask_threshold=threshold,
                                                                               stability_score_offset=offset))
            torch.testing.assert_close(stability, calculate_stability_score(upscaled, threshold, offset), rtol=0, atol=0)
            assert torch.equal(boxes, batched_mask_to_box(upscaled > threshold))


def test_images_encoded_together_get_each_its_own_masks(trained_micro_checkpoint):
    """--batch-size: several images in one encoder call, each decoded on its own features (all
    three levels of them), the masks it gets alone to float rounding."""
    generator = MaskGenerator(load_model(trained_micro_checkpoint, "micro", "cpu").model, AMGConfig(points_per_side=16))
    images = [make_generated_scene(np.random.default_rng(seed), 300, 380, min_objects=8, max_objects=14).image
              for seed in (2002, 2004)]
    together = generator.generate_batch(images)
    for image, masks in zip(images, together):
        alone = generator.generate(image)
        assert len(alone) >= 5
        assert_same_masks(masks, alone, min_iou=0.99)
