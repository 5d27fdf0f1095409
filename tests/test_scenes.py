"""Generated scenes and the micro model's training step (issue 6's groundwork)."""

import numpy as np
import torch

import train_micro_sam2
from sam2serve.checkpoints import build_random_model, model_size
from sam2serve.scenes import MIN_VISIBLE_FRACTION, make_scene


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
