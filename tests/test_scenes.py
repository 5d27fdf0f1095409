"""Generated scenes and the micro model's training: its step, logit calibration and file format."""

import argparse

import numpy as np
import pytest
import torch

from training import train_micro_sam2
from sam2serve.amg import image_predictor
from sam2serve.checkpoints import build_random_model, load_model, model_size
from sam2serve.model import PointDecoder
from training.photo_scenes import TRAINING_PHOTOS, make_photo_scene
from training.scenes import MIN_VISIBLE_FRACTION, make_scene

from .conftest import features_and_points


@pytest.mark.parametrize("make", [make_scene, make_photo_scene])
def test_scenes_are_deterministic_with_disjoint_visible_masks(make):
    scene = make(np.random.default_rng(7), 200, 260)
    again = make(np.random.default_rng(7), 200, 260)
    np.testing.assert_array_equal(scene.image, again.image)
    np.testing.assert_array_equal(scene.masks, again.masks)
    assert scene.image.shape == (200, 260, 3) and scene.image.dtype == np.uint8
    assert scene.masks.shape[1:] == (200, 260) and len(scene.masks) >= 1
    assert scene.masks.sum(axis=0).max() == 1  # occlusion: each pixel belongs to one object at most
    assert scene.masks.reshape(len(scene.masks), -1).sum(axis=1).min() >= MIN_VISIBLE_FRACTION * 200 * 260


def test_scenes_draw_from_min_to_max_objects_both_included():
    """min_objects and max_objects bound the objects drawn, both included (some are then left
    unlabelled where too little of them shows)."""
    counts = [len(make_scene(np.random.default_rng(seed), 128, 128, min_objects=1, max_objects=2).masks)
              for seed in range(12)]
    assert max(counts) == 2

    class CountedDraws:  # the scene's generator, its integer draws noted
        def __init__(self, rng):
            self.rng, self.integer_draws = rng, []

        def integers(self, *bounds, **options):
            self.integer_draws.append(bounds)
            return self.rng.integers(*bounds, **options)

        def __getattr__(self, name):
            return getattr(self.rng, name)

    draws = CountedDraws(np.random.default_rng(0))
    make_scene(draws, 96, 96, min_objects=2, max_objects=5)
    assert (2, 6) in draws.integer_draws  # the count of objects: 2 to 5


def test_visible_masks_are_what_later_shapes_leave_in_painting_order():
    """Each shape's mask is the part no later shape covers, in the order painted; a shape left
    with less than MIN_VISIBLE_FRACTION of the image is not labelled."""
    from training.scenes import visible_masks

    first, second, third = np.zeros((3, 20, 20), dtype=bool)
    first[:10] = True  # the top half
    second[5:] = True  # covers the top half's lower part
    third[:, :19] = True  # covers all but the last column: the second keeps 15 pixels, the first 5
    visible = visible_masks([first, second, third], 20, 20)
    assert MIN_VISIBLE_FRACTION * 400 < 5  # both labelled
    assert [int(mask.sum()) for mask in visible] == [5, 15, 380]
    assert not visible[1][:5].any() and visible[0][:5, 19].all()
    tiny = np.zeros((100, 100), dtype=bool)
    tiny[0, :39] = True  # 39 pixels: under 0.4% of the image
    assert len(visible_masks([tiny], 100, 100)) == 0
    tiny[0, 39] = True  # 40: enough
    assert len(visible_masks([tiny], 100, 100)) == 1


def test_object_colours_stand_out_from_what_they_cover():
    """An object's colour is at least 80 (L1, of 765) from the mean colour it covers."""
    from training.scenes import _distinct_colour

    rng = np.random.default_rng(0)
    for _ in range(200):
        avoid = rng.uniform(0, 255, 3)
        assert np.abs(_distinct_colour(rng, avoid) - avoid).sum() >= 80


def test_an_object_colour_stands_out_when_no_random_one_does(monkeypatch):
    """After 20 random colours too close, the fallback stands out too: mid grey's negative
    (255 - grey) was the grey itself."""
    from training import scenes

    monkeypatch.setattr(scenes, "_random_colour", lambda rng: np.full(3, 127.5, np.float32))
    for avoid in ([127.5, 127.5, 127.5], [128, 127, 100], [0, 0, 0], [255, 255, 255], [10, 250, 127.5]):
        avoid = np.array(avoid, np.float32)
        assert np.abs(scenes._distinct_colour(np.random.default_rng(0), avoid) - avoid).sum() >= 80, avoid


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


@pytest.mark.parametrize("prompt", ["points", "boxes"])
def test_training_decodes_prompts_as_sam2s_predictor_serves_them(trained_micro_checkpoint, prompt):
    """The model learns from the embeddings it is served with: a point, or a box (two corner
    points labelled 2 and 3 plus the padding point, as SAM2ImagePredictor sends it), through
    the training path gives the predictor's own low-resolution logits and IoU predictions."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    size = model.image_size  # the image at the model's input size: both use the same frame
    scene = make_scene(np.random.default_rng(3), size, size)
    predictor = image_predictor(model)
    rng = np.random.default_rng(0)
    corners = np.sort(rng.uniform(0, size, (5, 2, 2)), axis=1).reshape(5, 4).astype(np.float32)
    points = corners[:, :2] if prompt == "points" else None
    boxes = corners if prompt == "boxes" else None
    with torch.inference_mode():
        predictor.set_image(scene.image)
        if prompt == "points":
            _, ious, logits = predictor.predict(point_coords=points[:, None], point_labels=np.ones((5, 1)),
                                                multimask_output=True, return_logits=True)
        else:
            _, ious, logits = predictor.predict(box=boxes, multimask_output=True, return_logits=True)
        features = predictor._features
        trained_logits, trained_ious = train_micro_sam2.decode_prompts(
            model, features["image_embed"], features["high_res_feats"],
            None if points is None else torch.from_numpy(points)[None],
            None if boxes is None else torch.from_numpy(boxes)[None],
        )
    # Index 0 is the single-mask output; the predictor's multimask answer is outputs 1 to 3,
    # its low-resolution logits clamped to [-32, 32].
    np.testing.assert_allclose(trained_logits[:, 1:].clamp(-32, 32).numpy(), logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(trained_ious[:, 1:].numpy(), ious, rtol=1e-4, atol=1e-5)


def test_logit_calibration_scales_logits_and_keeps_masks_and_iou_predictions(trained_micro_checkpoint):
    """calibrate_logit_scale multiplies every mask logit by k: the same masks at threshold 0, the
    same IoU predictions, and afterwards edges rise across [-1, 1] in EDGE_BAND_PIXELS."""
    model = load_model(trained_micro_checkpoint, "micro", "cpu").model
    with torch.inference_mode():
        committed_slope = train_micro_sam2.median_edge_slope(model, seed=1)
    train_micro_sam2.scale_mask_logits(model, 0.25)  # calibrated already: make its logits 4x softer
    inputs = features_and_points(model, n_points=12)
    with torch.inference_mode():
        logits, ious = PointDecoder(model, multimask_output=True)(*inputs)
        scale = train_micro_sam2.calibrate_logit_scale(model, seed=1)
        scaled_logits, scaled_ious = PointDecoder(model, multimask_output=True)(*inputs)
    # The edges are 4x softer than the committed model's on the same scenes: k is 4x its own.
    assert scale == pytest.approx(4 * 2 / (train_micro_sam2.EDGE_BAND_PIXELS * committed_slope), rel=1e-3)
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


def test_photo_scenes_have_photo_texture_and_objects_that_stand_out():
    """Backgrounds and fills come from photos: fine detail everywhere, unlike flat fills."""
    for seed in range(6):
        scene = make_photo_scene(np.random.default_rng(seed), 256, 256)
        assert len(scene.masks) >= 1
        grey = scene.image.astype(np.float32).mean(axis=2)
        assert np.abs(np.diff(grey, axis=1)).mean() > 1.0  # texture and noise, not flat paint
        assert scene.masks.sum(axis=0).max() == 1


def test_training_photos_and_held_out_photos_are_disjoint():
    """No photo held out for evaluation is used for training, under another name or not: their
    32x32 grey thumbnails differ."""
    from PIL import Image

    from training.photo_scenes import _rgb
    from training.real_photos import HELD_OUT_PHOTOS

    def thumbnail(image: np.ndarray) -> np.ndarray:
        grey = Image.fromarray(_rgb(image)).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
        values = np.asarray(grey, dtype=np.float32).ravel()
        return (values - values.mean()) / (values.std() + 1e-6)

    held_out = [thumbnail(load().image) for load in HELD_OUT_PHOTOS.values()]
    for name, load in TRAINING_PHOTOS.items():
        training = thumbnail(load())
        correlations = [float(training @ other) / training.size for other in held_out]
        assert max(correlations) < 0.9, name
    assert not {name.split()[-1] for name in TRAINING_PHOTOS} & set(HELD_OUT_PHOTOS)


def test_training_photos_are_read_as_uint8_rgb_of_at_most_512_pixels():
    """Photos of floats in [0, 1] are scaled to 0-255 (not read as black), grey ones get three
    channels, and the longer side is cut to 512 keeping the shape."""
    from training.photo_scenes import _rgb

    assert (_rgb(np.full((4, 6), 0.5)) == 127).all() and _rgb(np.full((4, 6), 0.5)).shape == (4, 6, 3)
    assert (_rgb(np.full((4, 6, 3), 200.0)) == 200).all()
    assert _rgb(np.zeros((1000, 600, 3), dtype=np.uint8)).shape == (512, 307, 3)


def test_photo_scene_objects_stand_out_from_what_they_cover(monkeypatch):
    """A fill whose mean colour comes within MIN_FILL_CONTRAST (L1) of what it covers is moved
    that far from it, towards the middle where it covers a colour near white or black (not
    past 255 or 0, where the camera's clipping would take the contrast back). Each fill is made
    here the colour it covers; then the random draws are a stand-in's (a colour with a photo's
    detail, moved the way drawn unless that passes 255 or 0)."""
    from training import photo_scenes

    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    shape = (yy - 16) ** 2 + (xx - 16) ** 2 <= 10**2
    grey = np.full((32, 32, 3), 128.0, dtype=np.float32)
    monkeypatch.setattr(photo_scenes, "_distinct_colour", lambda rng, avoid: avoid)
    monkeypatch.setattr(photo_scenes, "_lighting", lambda rng, yy, xx, strength: np.ones((32, 32, 1)))
    monkeypatch.setattr(photo_scenes, "_fill", lambda rng, yy, xx, avoid: grey)
    monkeypatch.setattr(photo_scenes, "_photo_crop", lambda rng, photos, height, width: grey)
    rng = np.random.default_rng(0)
    for _ in range(12):  # every kind of fill
        fill = photo_scenes._object_fill(rng, [], yy, xx, grey, shape)[shape]
        assert np.abs(fill.mean(axis=0) - 128.0).sum() >= photo_scenes.MIN_FILL_CONTRAST - 1e-3

    class Draws:  # the middle of each range; "a colour with a photo's detail"; directions drawn as given
        def __init__(self, direction):
            self.direction = direction

        def random(self):
            return 0.5

        def uniform(self, low, high, size=None):
            return np.full(size, (low + high) / 2) if size else (low + high) / 2

        def choice(self, options, size):
            return np.full(size, self.direction)

    # Moved the way drawn, but not past black or white: the other way there.
    for direction, level, expected in [(1.0, 128.0, 148.0), (1.0, 250.0, 230.0), (1.0, 5.0, 25.0),
                                       (-1.0, 128.0, 108.0), (-1.0, 5.0, 25.0), (-1.0, 250.0, 230.0)]:
        covered = np.full((32, 32, 3), level, dtype=np.float32)
        monkeypatch.setattr(photo_scenes, "_photo_crop", lambda rng, photos, height, width, covered=covered: covered)
        fill = photo_scenes._object_fill(Draws(direction), [], yy, xx, covered, shape)[shape]
        np.testing.assert_allclose(fill, expected, rtol=0, atol=1e-3, err_msg=f"{direction}, {level}")


def test_photo_scene_pieces_show_what_a_camera_would():
    """Transparent parts of training photos are white, not their hidden black; every silhouette
    is an outline, not its image's square; a shadow falls beside its shape, never round the edge."""
    from training.photo_scenes import _cast_shadow, _rgb, _silhouette_sources

    cut_out = np.zeros((4, 6, 4), dtype=np.uint8)
    cut_out[:, :3] = (200, 40, 10, 255)  # left half opaque, right half transparent black
    rgb = _rgb(cut_out)
    assert (rgb[:, :3] == (200, 40, 10)).all() and (rgb[:, 3:] == 255).all()
    assert all(not silhouette.all() for silhouette in _silhouette_sources())

    image = np.full((40, 40, 3), 100.0, dtype=np.float32)
    shape = np.zeros((40, 40), dtype=bool)
    shape[10:30, 30:40] = True  # at the right edge, lit from the left: the shadow goes right
    _cast_shadow(np.random.default_rng(0), image, shape, np.array([0.0, 1.0]))
    assert image[:, :8].min() == 100.0  # the left edge is not darkened by a wrapped shadow
    assert image[10:30, 30:].max() < 100.0  # the shadow is there, beside the shape


def test_photo_share_picks_the_scene_kind_and_photo_scenes_ask_for_objects_only(monkeypatch):
    made = []

    def recording(make):
        def wrapped(*args, **kwargs):
            scene = make(*args, **kwargs)
            made.append((make.__name__, scene))
            return scene
        return wrapped

    monkeypatch.setattr(train_micro_sam2, "make_scene", recording(make_scene))
    monkeypatch.setattr(train_micro_sam2, "make_photo_scene", recording(make_photo_scene))
    train_micro_sam2.training_batch(0, 0, n_images=2, n_points=8, image_size=128, photo_share=0.0)
    assert [name for name, _ in made] == ["make_scene"] * 2
    made.clear()
    *_, targets = train_micro_sam2.training_batch(0, 0, n_images=2, n_points=8, image_size=128, photo_share=1.0)
    assert [name for name, _ in made] == ["make_photo_scene"] * 2
    for (_, scene), image_targets in zip(made, targets):
        for target in image_targets.numpy():  # every target is one of the scene's objects
            assert any(np.array_equal(target, mask) for mask in scene.masks)


def test_training_goes_on_from_a_calibrated_checkpoint_with_its_calibration_undone(tmp_path):
    model = build_random_model(model_size("micro"), seed=3)
    path = tmp_path / "micro.pt"
    train_micro_sam2.save_trained(model, path, {"logit_scale": 4.0})
    restarted = train_micro_sam2.trained_start(path)
    for mlp, original in zip(restarted.sam_mask_decoder.output_hypernetworks_mlps,
                             model.sam_mask_decoder.output_hypernetworks_mlps):
        expected = original.layers[-1].weight.half().float() / 4.0
        torch.testing.assert_close(mlp.layers[-1].weight, expected)


def test_an_interrupted_training_run_leaves_the_output_model_as_it_was(tmp_path, monkeypatch):
    """Interim weights go beside --output (whose default is the committed model), never over it."""
    output = tmp_path / "sam2.1_hiera_micro.pt"
    output.write_bytes(b"the model before")
    args = argparse.Namespace(seed=0, init=None, lr=1e-3, steps=2, save_every=1, output=output, images_per_step=1,
                              points_per_image=2, photo_share=0.0, photo_from=0)

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_micro_sam2, "calibrate_logit_scale", interrupted)  # right after the last step
    with pytest.raises(KeyboardInterrupt):
        train_micro_sam2.train(args)
    assert output.read_bytes() == b"the model before"
    interim = tmp_path / "sam2.1_hiera_micro.interim.pt"
    assert torch.load(interim, weights_only=True)["training"] == {"steps_done": 1}
    load_model(interim, "micro", "cpu")  # a checkpoint --init can go on from


def test_small_scenes_can_be_made():  # benchmark.py --size 64 64 drew specks of negative radius
    for seed in range(20):
        assert make_scene(np.random.default_rng(seed), 64, 48).image.shape == (64, 48, 3)


def test_held_out_box_figure_pairs_each_object_with_its_own_box(trained_micro_checkpoint):
    """tight_box is the mask's outer pixel edges (x first); tight_box_ious gives each object the
    mask of its own box: high on the committed model (boxes with x and y swapped, or masks out of
    the objects' order, would score far lower)."""
    from training.evaluation import held_out_scenes, tight_box, tight_box_ious

    mask = np.zeros((6, 8), dtype=bool)
    mask[1:4, 2:5] = True
    assert tight_box(mask) == [2, 1, 5, 4]
    predictor = image_predictor(load_model(trained_micro_checkpoint, "micro", "cpu").model)
    scene = held_out_scenes(1)[0]
    assert len(scene.masks) >= 3
    with torch.inference_mode():
        predictor.set_image(scene.image)
    ious = tight_box_ious(predictor, scene)
    assert len(ious) == len(scene.masks) and np.mean(ious) > 0.7


def test_held_out_figures_of_known_masks():
    """interior_point: the pixel farthest from the mask's border, the image's edge counting as
    one, as (x, y) at its centre; mask_iou of two empty masks is 1; an object is found by the
    mask that covers it at IoU 0.5 or more (0.5 included), and two masks on one object find it
    once."""
    from training.evaluation import interior_point, mask_iou, objects_found

    touching_left = np.zeros((7, 9), dtype=bool)
    touching_left[1:6, 0:5] = True
    assert interior_point(touching_left) == (2.5, 3.5)
    empty = np.zeros((4, 4), dtype=bool)
    assert mask_iou(empty, empty) == 1.0 and mask_iou(touching_left, ~touching_left) == 0.0

    objects = np.zeros((2, 4, 4), dtype=bool)
    objects[0, :2] = objects[1, 2:] = True  # the top half, the bottom half
    half_of_the_bottom = np.zeros((1, 4, 4), dtype=bool)
    half_of_the_bottom[0, 2:, :2] = True
    assert objects_found(half_of_the_bottom, objects) == 1  # IoU 0.5 exactly
    assert objects_found(np.stack([objects[0], objects[0]]), objects) == 1
    assert objects_found(objects[:0], objects) == 0 and objects_found(objects, objects[:0]) == 0


def test_single_point_figure_takes_the_mask_sam2_predicts_best_for_each_objects_point():
    """Of the three masks sam2's predictor gives for an object's interior point, the one with
    the highest predicted IoU is scored (mask k of object i here is i's own only where k is the
    best), and each object is asked with its own point."""
    from training.evaluation import single_point_ious
    from training.scenes import Scene

    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, :4, :4] = masks[1, 4:, 4:] = True
    best = [2, 0]
    asked = []

    class Predictor:
        def set_image(self, image):
            pass

        def predict(self, point_coords, point_labels, multimask_output, return_logits):
            asked.append(point_coords.tolist())
            logits = np.full((2, 3, 8, 8), -1.0)
            for i, k in enumerate(best):
                logits[i, k][masks[i]] = 1.0
            scores = np.full((2, 3), 0.1)
            scores[[0, 1], best] = 0.9
            return logits, scores, None

    assert single_point_ious(Predictor(), Scene(image=np.zeros((8, 8, 3), np.uint8), masks=masks)) == [1.0, 1.0]
    assert asked == [[[[1.5, 1.5]], [[5.5, 5.5]]]]  # a pixel farthest from each object's border, at its centre


def test_held_out_evaluation_averages_over_objects_and_scenes(monkeypatch):
    """evaluate's figures: mIoUs over every object of every scene, AMG recall the objects found
    over all objects, masks per image over the scenes."""
    from training import evaluation
    from training.scenes import Scene

    scenes = [Scene(image=None, masks=np.zeros((n, 2, 2), dtype=bool)) for n in (1, 3)]
    monkeypatch.setattr(evaluation, "held_out_scenes", lambda n: scenes[:n])
    monkeypatch.setattr(evaluation, "image_predictor", lambda model: "predictor")
    monkeypatch.setattr(evaluation, "MaskGenerator", lambda model, config: "generator")
    monkeypatch.setattr(evaluation, "single_point_ious", lambda predictor, scene: [1.0] * (len(scene.masks) - 1) + [0.6])
    monkeypatch.setattr(evaluation, "tight_box_ious", lambda predictor, scene: [0.5] * len(scene.masks))
    monkeypatch.setattr(evaluation, "amg_matches", lambda generator, scene: (len(scene.masks) - 1, 5 * len(scene.masks)))
    result = evaluation.evaluate(model=None, n_scenes=2)
    assert result == evaluation.Evaluation(scenes=2, objects=4, single_point_miou=pytest.approx(3.2 / 4), box_miou=0.5,
                                           amg_recall=0.5, masks_per_image=10.0)
    assert "AMG recall at IoU >= 0.5   0.500" in result.table()


def test_training_says_how_to_serve_its_model_and_where_a_stopped_runs_weights_are(tmp_path):
    """A model trained into a file of another name is served once named as the server finds it:
    the run ends saying how. A run stopped (Ctrl-C) said only "stopped": it now says where its
    interim weights are, after how many steps, and how to go on from them."""
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    small = ["--images-per-step", "1", "--points-per-image", "2", "--eval-scenes", "1"]
    output = tmp_path / "model.pt"
    trained = subprocess.run([sys.executable, "-m", "training.train_micro_sam2", "--steps", "2", *small,
                              "--output", str(output)], cwd=repo, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr
    assert trained.stderr.rstrip().endswith(
        f"serve it: the server finds it as sam2.1_hiera_micro.pt in its folder: mv {output} "
        f"{tmp_path}/sam2.1_hiera_micro.pt; python server.py {tmp_path} micro")
    named = tmp_path / "sam2.1_hiera_micro.pt"
    assert train_micro_sam2.serving_hint(named) == f"serve it: python server.py {tmp_path} micro"
    assert train_micro_sam2.serving_hint(tmp_path / "my runs" / "sam2.1_hiera_micro.pt") == (
        f"serve it: python server.py '{tmp_path}/my runs' micro")  # pasted into a shell

    interim = tmp_path / "sam2.1_hiera_micro.interim.pt"
    run = subprocess.Popen([sys.executable, "-m", "training.train_micro_sam2", "--steps", "5000", "--save-every", "2",
                            *small, "--output", str(named)], cwd=repo, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # not ignored, as under &
    try:
        deadline = time.monotonic() + 300
        while not interim.exists():
            assert time.monotonic() < deadline and run.poll() is None, "no interim weights were written"
            time.sleep(0.1)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    steps = re.search(rf"the weights after (\d+) of 5000 steps are in {re.escape(str(interim))}: go on from them "
                      rf"with --init {re.escape(str(interim))}", stderr)
    assert steps and int(steps[1]) % 2 == 0 and int(steps[1]) > 0, stderr[-2000:]
    assert stderr.rstrip().endswith("stopped (Ctrl-C)") and not named.exists()
