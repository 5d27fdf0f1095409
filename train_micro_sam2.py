"""Trains the micro SAM2.1 on generated scenes, then evaluates it on scenes it never saw.

No pretrained SAM2 weights can be downloaded on the project's machines, and random weights
give one mask per image. This script makes the project's own small model that really
segments: the micro configuration of sam2serve.checkpoints (the SAM2.1 architecture, 1.8 M
parameters, 256-pixel input), trained as SAM is trained: prompts sampled inside objects (half
points, half boxes), three candidate masks per prompt of which only the best is penalised
(focal + dice), plus the single-mask output, and an MSE loss that teaches the IoU head the IoU
each mask really has.

    python train_micro_sam2.py                      # 6000 steps, about 40 min on 2 quiet CPU cores
    python train_micro_sam2.py --evaluate-only      # held-out figures of the saved model

Seeded: the same arguments give the same weights on the same machine and torch version.

Two things make it learn from scratch (without them it sits on a plateau where the masks do
not depend on the prompt):
- The neck's projections and the decoder's high-resolution projections start at zero. SAM's
  encoder is pretrained; a random one feeds the decoder features that are pure noise, added
  right before the mask is read out, and the decoder cannot learn where the prompt is through
  that noise. From zero, the decoder first learns to place masks from the prompt's positional
  encoding, and the features grow in as they become useful.
- Box prompts, as SAM trains with: a box says where the object is much more plainly than a
  point, so the positional path is learnt sooner; points then use it.
"""

import argparse
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sam2serve.amg import ImageEncoder
from sam2serve.checkpoints import build_random_model, load_model, model_size
from sam2serve.evaluation import evaluate
from sam2serve.preprocess import image_to_input
from sam2serve.scenes import make_scene

log = logging.getLogger("train_micro_sam2")

DEFAULT_OUTPUT = Path(__file__).parent / "models" / "sam2.1_hiera_micro.pt"
TRAIN_SEED_OFFSET = 1_000_000  # training scenes come from seeds far from the held-out ones
FOCAL_WEIGHT = 20.0  # SAM's 20:1 focal:dice ratio
BACKGROUND_PROMPT_SHARE = 0.1  # some prompts fall on the background, whose mask is "the rest"
BOX_JITTER = 0.1  # box corners move by this share of the box's side (SAM's box noise)


def sample_prompts(rng: np.random.Generator, masks: np.ndarray, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Points inside objects (and some on the background) with the mask each one asks for.

    Returns (n_points, 2) pixel coordinates (x, y) and (n_points, H, W) target masks.
    """
    regions = list(masks)
    background = ~masks.any(axis=0)
    points, targets = [], []
    for _ in range(n_points):
        if background.any() and (not regions or rng.random() < BACKGROUND_PROMPT_SHARE):
            region = background
        else:
            region = regions[rng.integers(len(regions))]
        ys, xs = np.nonzero(region)
        pick = rng.integers(len(ys))
        points.append((xs[pick] + 0.5, ys[pick] + 0.5))
        targets.append(region)
    return np.array(points, dtype=np.float32), np.stack(targets)


def jittered_boxes(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """(N, H, W) masks -> (N, 4) XYXY boxes around them, each corner moved by a little noise."""
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        side = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dtype=np.float32)
        boxes.append(np.array([x0, y0, x1, y1], dtype=np.float32) + rng.normal(0, BOX_JITTER, 4) * side)
    return np.clip(np.array(boxes, dtype=np.float32), 0, masks.shape[-1])


def training_batch(step: int, seed: int, n_images: int, n_points: int, image_size: int):
    """Scenes for one step, from seeds that depend only on (seed, step): reproducible.

    Returns images (B, 3, R, R), and per prompt its point (B, K, 2), the box around its target
    (B, K, 4) and the target (B, K, R, R); each prompt is used as a point or as a box.
    """
    rng = np.random.default_rng([seed + TRAIN_SEED_OFFSET, step])
    images, points, boxes, targets = [], [], [], []
    for _ in range(n_images):
        scene = make_scene(rng, image_size, image_size)
        p, t = sample_prompts(rng, scene.masks, n_points)
        images.append(image_to_input(scene.image, image_size))
        points.append(torch.from_numpy(p))
        boxes.append(torch.from_numpy(jittered_boxes(rng, t)))
        targets.append(torch.from_numpy(t))
    return torch.cat(images), torch.stack(points), torch.stack(boxes), torch.stack(targets)


def decode_prompts(model, image_embed, high_res, points: torch.Tensor | None, boxes: torch.Tensor | None):
    """All four decoder outputs (single mask + three multimask) for (B, K, 2) points or
    (B, K, 4) boxes, already in the model's input frame (scenes are square)."""
    prompts = points if points is not None else boxes
    n_points = prompts.shape[1]
    if points is not None:
        coords = points.reshape(-1, 1, 2)
        labels = torch.ones((len(coords), 1), dtype=torch.int)
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    else:
        sparse, dense = model.sam_prompt_encoder(points=None, boxes=boxes.reshape(-1, 4), masks=None)
    repeat = lambda x: x.repeat_interleave(n_points, dim=0)  # noqa: E731
    masks, iou_preds, _, _ = model.sam_mask_decoder.predict_masks(
        image_embeddings=repeat(image_embed),
        image_pe=model.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        repeat_image=False,
        high_res_features=[repeat(f) for f in high_res],
    )
    return masks, iou_preds  # (B*K, 4, h, w), (B*K, 4)


def mask_losses(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per mask focal+dice loss and true IoU. logits (N, M, h, w), targets (N, h, w) float."""
    targets = targets[:, None].expand_as(logits)
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    focal = (ce * (1 - p_t) ** 2 * (0.25 * targets + 0.75 * (1 - targets))).mean(dim=(2, 3))
    dice = 1 - (2 * (prob * targets).sum(dim=(2, 3)) + 1) / (prob.sum(dim=(2, 3)) + targets.sum(dim=(2, 3)) + 1)
    predicted = (logits > 0).float()
    intersection = (predicted * targets).sum(dim=(2, 3))
    union = predicted.sum(dim=(2, 3)) + targets.sum(dim=(2, 3)) - intersection
    iou = intersection / union.clamp(min=1)
    return FOCAL_WEIGHT * focal + dice, iou


def training_step(model, images, points, boxes, targets) -> torch.Tensor:
    """Loss of one batch: the first half of each image's prompts as points, the rest as boxes."""
    image_embed, feat_s0, feat_s1 = ImageEncoder(model)(images)
    half = points.shape[1] // 2
    point_logits, point_ious = decode_prompts(model, image_embed, [feat_s0, feat_s1], points[:, :half], None)
    box_logits, box_ious = decode_prompts(model, image_embed, [feat_s0, feat_s1], None, boxes[:, half:])
    logits, iou_preds = torch.cat([point_logits, box_logits]), torch.cat([point_ious, box_ious])
    targets = torch.cat([targets[:, :half].flatten(0, 1), targets[:, half:].flatten(0, 1)])
    # Masks are compared at the decoder's own resolution (a quarter of the input).
    targets = F.adaptive_avg_pool2d(targets[:, None].float(), logits.shape[-2:])[:, 0].round()
    losses, true_iou = mask_losses(logits, targets)
    # Multimask outputs: only the best of the three is penalised (SAM's ambiguity-aware loss).
    mask_loss = losses[:, 1:].min(dim=1).values.mean() + losses[:, 0].mean()
    iou_loss = F.mse_loss(iou_preds, true_iou.detach())
    return mask_loss + iou_loss


def zero_feature_projections(model) -> None:
    """Starts the neck's and the decoder's high-resolution projections at zero (see the top)."""
    projections = [level.conv for level in model.image_encoder.neck.convs]
    projections += [model.sam_mask_decoder.conv_s0, model.sam_mask_decoder.conv_s1]
    with torch.no_grad():
        for conv in projections:
            conv.weight.zero_()
            conv.bias.zero_()


def save_checkpoint(model, path: Path, meta: dict) -> None:
    """Official format ("model" holds the state dict), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".partial", delete=False) as tmp:
        torch.save({"model": model.state_dict(), "training": meta}, tmp)
    os.replace(tmp.name, path)


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    model = build_random_model(model_size("micro"), args.seed)
    zero_feature_projections(model)
    model.train()
    image_size = model.image_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = min(100, args.steps // 10)

    def learning_rate(step: int) -> float:  # linear warm-up, then cosine decay to 1%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate)
    started, running = time.perf_counter(), None
    progress = tqdm(range(args.steps), desc="training", unit="step")
    for step in progress:
        loss = training_step(model, *training_batch(step, args.seed, args.images_per_step, args.points_per_image,
                                                    image_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        progress.set_postfix(loss=f"{running:.3f}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:  # resumable progress
            save_checkpoint(model, args.output, {"steps_done": step + 1})
    minutes = (time.perf_counter() - started) / 60
    meta = {key: value for key, value in vars(args).items() if key != "output"}
    meta.update(minutes=round(minutes, 1), torch=str(torch.__version__))
    save_checkpoint(model.eval(), args.output, meta)
    log.info("trained %d steps in %.1f min, wrote %s", args.steps, minutes, args.output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--images-per-step", type=int, default=4)
    parser.add_argument("--points-per-image", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=250, help="steps between interim checkpoints")
    parser.add_argument("--eval-scenes", type=int, default=50, help="held-out scenes for the figures")
    parser.add_argument("--evaluate-only", action="store_true", help="only evaluate the saved model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.evaluate_only:
        train(args)
    loaded = load_model(args.output, "micro", "cpu")
    result = evaluate(loaded.model, n_scenes=args.eval_scenes)
    print(result.table())


if __name__ == "__main__":
    main()
