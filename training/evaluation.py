"""Held-out evaluation of a model on generated scenes, against their known instance masks.

Three figures, as SAM reports them:
- single-point mIoU: one point per object (its most interior pixel), sam2's own image predictor
  with multimask output, the mask with the highest predicted IoU, its IoU with the object;
- box mIoU: the object's tight box (pixel edges), sam2's predictor with one output mask, its IoU
  with the object (the decoder's own mask: /segment also applies sam2's fallback for an unstable
  single mask, sam2_prompt_settings, which changes a few objects' masks);
- automatic-mask-generation recall: the share of objects that some generated mask covers at
  IoU >= 0.5, with the default AMG thresholds.

Held-out scenes use seeds 0, 1, 2, ...; training draws its scenes from other seeds.
"""

from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt
from tqdm import tqdm
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor

from sam2serve.amg import AMGConfig, MaskGenerator, image_predictor
from sam2serve.rle import rles_to_masks
from training.scenes import Scene, make_scene

RECALL_IOU = 0.5


def held_out_scenes(n_scenes: int, height: int = 512, width: int = 512) -> list[Scene]:
    return [make_scene(np.random.default_rng(seed), height, width) for seed in range(n_scenes)]


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The pixel farthest from the mask's border, as (x, y) at the pixel's centre."""
    distance = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(np.argmax(distance), distance.shape)
    return x + 0.5, y + 0.5


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@torch.inference_mode()
def best_mask_logits(predictor: SAM2ImagePredictor, scene: Scene) -> np.ndarray:
    """(objects, H, W) logits at the image's size: for one interior point per object, the mask of
    the three with the highest predicted IoU (what a user of sam2's predictor would take)."""
    predictor.set_image(scene.image)
    points = np.array([interior_point(mask) for mask in scene.masks], dtype=np.float32)
    if len(points) == 0:
        return np.zeros((0, *scene.masks.shape[1:]), dtype=np.float32)
    logits, scores, _ = predictor.predict(
        point_coords=points[:, None, :], point_labels=np.ones((len(points), 1)), multimask_output=True,
        return_logits=True,
    )
    logits, scores = logits.reshape(len(points), -1, *scene.masks.shape[1:]), scores.reshape(len(points), -1)
    return logits[np.arange(len(points)), scores.argmax(axis=1)]


def single_point_ious(predictor: SAM2ImagePredictor, scene: Scene) -> list[float]:
    best = best_mask_logits(predictor, scene) > 0  # sam2's mask threshold
    return [mask_iou(pred, truth) for pred, truth in zip(best, scene.masks)]


def tight_box(mask: np.ndarray) -> list[float]:
    """x0, y0, x1, y1 at the outer edges of the mask's pixels."""
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@torch.inference_mode()
def tight_box_ious(predictor: SAM2ImagePredictor, scene: Scene) -> list[float]:
    """For each object, the IoU of the one mask sam2's predictor gives for its tight box (the
    image must be set already)."""
    if len(scene.masks) == 0:
        return []
    boxes = np.array([tight_box(mask) for mask in scene.masks], dtype=np.float32)
    masks, _, _ = predictor.predict(box=boxes, multimask_output=False)
    masks = masks.reshape(len(boxes), *scene.masks.shape[1:]) > 0
    return [mask_iou(pred, truth) for pred, truth in zip(masks, scene.masks)]


def amg_matches(generator: MaskGenerator, scene: Scene) -> tuple[int, int]:
    """(objects found at IoU >= 0.5, masks generated)."""
    masks = rles_to_masks(generator.generate(scene.image))
    return objects_found(masks, scene.masks), len(masks)


def objects_found(masks: np.ndarray, objects: np.ndarray) -> int:
    """How many of the objects (N, H, W) some mask (M, H, W) covers at IoU >= 0.5."""
    if len(masks) == 0 or len(objects) == 0:
        return 0
    truth, generated = objects.reshape(len(objects), -1), masks.reshape(len(masks), -1)
    intersection = truth.astype(np.float32) @ generated.T.astype(np.float32)
    union = truth.sum(axis=1)[:, None] + generated.sum(axis=1)[None, :] - intersection
    ious = intersection / np.maximum(union, 1)  # (objects, generated)
    return int((ious.max(axis=1) >= RECALL_IOU).sum())


@dataclass(frozen=True)
class Evaluation:
    scenes: int
    objects: int
    single_point_miou: float
    box_miou: float
    amg_recall: float
    masks_per_image: float

    def table(self) -> str:
        return "\n".join(
            [
                f"held-out scenes            {self.scenes} ({self.objects} objects)",
                f"single-point mIoU          {self.single_point_miou:.3f}",
                f"box mIoU                   {self.box_miou:.3f}",
                f"AMG recall at IoU >= {RECALL_IOU}   {self.amg_recall:.3f}",
                f"AMG masks per image        {self.masks_per_image:.1f}",
            ]
        )


def evaluate(model: SAM2Base, n_scenes: int = 50, config: AMGConfig = AMGConfig()) -> Evaluation:
    scenes = held_out_scenes(n_scenes)
    predictor, generator = image_predictor(model), MaskGenerator(model, config)
    ious, box_ious, found, generated = [], [], 0, 0
    for scene in tqdm(scenes, desc="held-out evaluation", unit="scene"):
        ious += single_point_ious(predictor, scene)  # sets the image for tight_box_ious
        box_ious += tight_box_ious(predictor, scene)
        hits, count = amg_matches(generator, scene)
        found, generated = found + hits, generated + count
    objects = sum(len(scene.masks) for scene in scenes)
    return Evaluation(
        scenes=len(scenes),
        objects=objects,
        single_point_miou=float(np.mean(ious)),
        box_miou=float(np.mean(box_ious)),
        amg_recall=found / objects,
        masks_per_image=generated / len(scenes),
    )
