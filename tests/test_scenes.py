"""Generated scenes and the micro model's training: its step, logit calibration and file format."""

import numpy as np
import pytest
import torch

from training import train_micro_sam2
from sam2serve.checkpoints import build_random_model, load_model, model_size
from sam2serve.model import PointDecoder
from training.scenes import MIN_VISIBLE_FRACTION, make_scene

from .conftest import features_and_points


def test_scenes_are_deterministic_with_disjoint_visible_masks():
    scene = make_scene(np.random.default_rng(7), 200, 260)
    again = make_scene(np.random.default_rng(7), 200, 260)
    np.testing.assert_array_equal(scene.image, again.image)
    np.testing.assert_array_equal(scene.masks, again.masks)
    assert scene.image.shape == (200, 260, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape[1:] == (200, 260) and len(scene.masks) >= 1
    assert scene.masks.sum(axis=0).max() == 1  # occlusion: each pixel belongs to one object at most
    assert scene.masks.reshape(len(scene.masks), -1).sum(axis=1).min() >= MIN_VISIBLE_FRACTION * 200 * 260


def test_prompts_fall_inside_the_mask_they_ask_for():
    rng = np.random.default_rng(0)
    scene = make_scene(rng, 128, 128)
    points, targets = train_micro_sam2.sample_prompts(rng, scene.masks, 20)
    for (x, y), target in zip(points, targets):
        assert target[int(y), int(x)]
    # Boxes hold their target, give or take the jitter.
    for (x0, y0, x1, y1), target in zip(train_micro_sam2.jittered_boxes(rng, targets), targets):
        ys, xs = np.nonzero(target)
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert abs(x0 - xs.min()) <= 0.5 * side and abs(x1 - xs.max() - 1) <= 0.5 * side
        assert abs(y0 - ys.min()) <= 0.5 * side and abs(y1 - ys.max() - 1) <= 0.5 * side


def test_mask_loss_rewards_an_edge_placed_between_pixels():
    """Targets are the share of each pixel inside the object: sharp logits whose zero crossing
    sits where the true edge is (between pixels) lose less than logits whose edge is rounded to
    a whole pixel, or pulled in by as much; the IoU handed to the IoU head counts the pixels at
    least half inside."""
    x = torch.arange(16, dtype=torch.float32) + 0.5  # pixel centres
    edge = 6.6  # the object covers x < 6.6: pixel 6 is 60 % inside
    targets = (edge - x + 0.5).clamp(0, 1).expand(16, 16)[None]  # (1, 16, 16)

    def loss_and_iou(logit_edge: float) -> tuple[float, float]:
        logits = (8 * (logit_edge - x)).expand(1, 1, 16, 16)  # logits cross 0 at logit_edge
        loss, iou = train_micro_sam2.mask_losses(logits, targets)
        return loss.item(), iou.item()

    (at_edge, iou_at_edge), (rounded, _), (pulled_in, iou_pulled_in) = map(loss_and_iou, (edge, 7.0, 6.2))
    assert at_edge < rounded and at_edge < pulled_in
    assert iou_at_edge == 1.0  # pixel 6 is more than half inside, and predicted
    assert iou_pulled_in == pytest.approx(6 / 7)  # pixel 6's centre (6.5) falls outside the mask


def test_training_steps_fit_one_batch():
    """The loss, the decoder's four outputs and the optimiser are wired up: one batch is learnt."""
    torch.manual_seed(0)
    model = build_random_model(model_size("micro"), seed=0).train()
    train_micro_sam2.zero_feature_projections(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = train_micro_sam2.training_batch(0, 0, n_images=1, n_points=4, image_size=model.image_size)
    losses = []
    for _ in range(24):
        loss = train_micro_sam2.training_step(model, *batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    # The high-resolution path learns: conv_s0/conv_s1 start at zero and must leave it (they stay
    # at zero forever if the neck's projections that feed them start at zero too).
    for conv in (model.sam_mask_decoder.conv_s0, model.sam_mask_decoder.conv_s1):
        assert conv.weight.abs().max() > 0


def test_logit_calibration_scales_logits_and_keeps_masks_and_iou_predictions(trained_micro_checkpoint):
    """calibrate_logit_scale multiplies every mask logit by k: the same masks at threshold 0, the
    same IoU predictions, and afterwards edges rise across [-1, 1] in EDGE_BAND_PIXELS."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    with torch.no_grad():  # the committed model is calibrated already: make its logits 4x softer
        for mlp in model.sam_mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(0.25)
            mlp.layers[-1].bias.mul_(0.25)
    inputs = features_and_points(model, n_points=12)
    with torch.inference_mode():
        logits, ious = PointDecoder(model, multimask_output=True)(*inputs)
        scale = train_micro_sam2.calibrate_logit_scale(model, seed=1)
        scaled_logits, scaled_ious = PointDecoder(model, multimask_output=True)(*inputs)
    assert 3 < scale < 5  # about the 4 taken away (other calibration scenes than the committed model's)
    torch.testing.assert_close(scaled_logits, scale * logits, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(scaled_ious, ious)
    assert torch.equal(scaled_logits > 0, logits > 0)
    slope = train_micro_sam2.median_edge_slope(model, seed=1)
    assert abs(slope * train_micro_sam2.EDGE_BAND_PIXELS / 2 - 1) < 1e-3


def test_checkpoint_is_saved_in_half_precision_and_loads_into_float32(tmp_path):
    model = build_random_model(model_size("micro"), seed=3)
    path = tmp_path / "micro.pt"
    train_micro_sam2.save_trained(model, path, {"steps_done": 0})
    stored = torch.load(path, weights_only=True)["model"]
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    loaded = load_model(path, "micro", "cpu").model
    for name, value in model.state_dict().items():
        reloaded = loaded.state_dict()[name]
        assert reloaded.dtype == value.dtype
        torch.testing.assert_close(reloaded, value.half().to(value.dtype), rtol=0, atol=0)


def test_training_writes_the_model_the_server_serves_by_default(trained_micro_checkpoint):
    """python -m training.train_micro_sam2 (and --evaluate-only) reads and writes the committed model."""
    assert train_micro_sam2.DEFAULT_OUTPUT == trained_micro_checkpoint


def test_held_out_real_photos_load_with_their_instance_masks():
    from training.real_photos import HELD_OUT_PHOTOS

    scenes = {name: load() for name, load in HELD_OUT_PHOTOS.items()}
    assert len(scenes) >= 8
    for scene in scenes.values():
        assert scene.image.dtype == np.uint8 and scene.image.ndim == 3 and scene.image.shape[2] == 3
        assert scene.masks.shape[1:] == scene.image.shape[:2]
    assert sum(len(scene.masks) for scene in scenes.values()) == 27  # voc 19, arc2017 8
