"""Automatic mask generation: a grid of point prompts over the image, the SAM2 mask decoder on
every point, filtering by predicted IoU and stability, box NMS, masks out as COCO RLE.

Two generators with one interface (`generate(image) -> list of RLE`):
- `ReferenceMaskGenerator`: the `sam2` package's own SAM2AutomaticMaskGenerator, unmodified.
- `MaskGenerator`: the project's pipeline, the same algorithm and the same numbers with less
  work. Its mask decoder (`decoder.FactoredPointDecoder`) does the image-side work once per
  image instead of once per prompt, and computes no mask for a prompt whose every predicted IoU
  fails the filter (the IoU head does not need masks). Per point batch it filters by predicted
  IoU before upscaling, keeps survivors as low-resolution logits, and only after NMS upscales
  the masks that are kept, encoding them all at once on the device with one copy to the host.
"""

from dataclasses import asdict, dataclass, fields, replace
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.amg import (
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from torchvision.ops.boxes import batched_nms, box_area

from .decoder import FactoredPointDecoder, default_prompts_per_step
from .preprocess import image_to_input
from .rle import RLE, rle_run_lengths, run_lengths_to_rles


@dataclass(frozen=True)
class AMGConfig:
    """Mask-generation settings. Names and defaults are those of sam2's generator."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    multimask_output: bool = True

    def __post_init__(self) -> None:
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.crop_n_layers < 0:
            raise ValueError(f"crop_n_layers must be >= 0, got {self.crop_n_layers}")
        for name in ("stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")


class Generator(Protocol):
    def generate(self, image: np.ndarray) -> list[RLE]:
        """(H, W, 3) uint8 RGB -> masks as COCO RLE, in the order NMS keeps them."""
        ...

    def generate_batch(self, images: list[np.ndarray]) -> list[list[RLE]]:
        """generate() of each image, where the generator can share work between them."""
        ...

    def with_config(self, config: AMGConfig) -> "Generator":
        """The same generator, model and kernels under other settings (benchmarks try several
        thresholds on one compiled model)."""
        ...


def fit_predictor_to_model(predictor: SAM2ImagePredictor) -> SAM2ImagePredictor:
    """Sets the predictor's feature-map sizes from the model's input size.

    sam2 hard-codes them for the official 1024-pixel input; the micro model takes 512.
    For the official sizes this changes nothing.
    """
    size = predictor.model.image_size
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return predictor


def image_predictor(model: SAM2Base) -> SAM2ImagePredictor:
    """sam2's single-image predictor (the reference for point prompts) for any input size."""
    return fit_predictor_to_model(SAM2ImagePredictor(model))


class ReferenceMaskGenerator:
    """The `sam2` package's SAM2AutomaticMaskGenerator, unmodified: the baseline."""

    def __init__(self, model: SAM2Base, config: AMGConfig) -> None:
        self.config = config
        self.generator = SAM2AutomaticMaskGenerator(
            model, **asdict(config), output_mode="uncompressed_rle"
        )
        fit_predictor_to_model(self.generator.predictor)

    def generate(self, image: np.ndarray) -> list[RLE]:
        return [record["segmentation"] for record in self.generator.generate(image)]

    def generate_batch(self, images: list[np.ndarray]) -> list[list[RLE]]:
        return [self.generate(image) for image in images]  # sam2's generator takes one image

    def with_config(self, config: AMGConfig) -> "ReferenceMaskGenerator":
        return ReferenceMaskGenerator(self.generator.predictor.model, config)


@dataclass(frozen=True)
class ImageFeatures:
    """What the image encoder gives the mask decoder, for one image."""

    image_embed: torch.Tensor  # (1, C, H/16, W/16)
    high_res_feats: list[torch.Tensor]  # [(1, C/8, H/4, W/4), (1, C/4, H/8, W/8)]


@dataclass(frozen=True)
class Candidates:
    """Masks that passed the filters, with what NMS and rendering need.

    Masks are kept as the decoder's low-resolution logits (a quarter of the model's input size,
    256x256 for the official models, whatever the image size) and upscaled again for the few
    that survive NMS.
    """

    low_res_logits: torch.Tensor  # (N, h, w)
    iou_preds: torch.Tensor  # (N,)
    stability_scores: torch.Tensor  # (N,)
    boxes: torch.Tensor  # (N, 4) XYXY
    points: torch.Tensor  # (N, 2) the point prompt, in pixels
    crop_boxes: torch.Tensor  # (N, 4) XYXY of the crop the mask was predicted in

    def __len__(self) -> int:
        return len(self.iou_preds)

    def select(self, index: torch.Tensor | slice) -> "Candidates":
        return Candidates(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def cat(parts: list["Candidates"]) -> "Candidates":
        return Candidates(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Candidates)})


class ImageEncoder(torch.nn.Module):
    """Model input (B, 3, R, R) -> what the mask decoder needs: (image_embed, feat_s0, feat_s1).

    As sam2's SAM2ImagePredictor.set_image, as one module with tensors in and out, so that the
    fast modes can compile or export it.
    """

    def __init__(self, model: SAM2Base) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        backbone_out = self.model.forward_image(images)
        _, vision_feats, _, feat_sizes = self.model._prepare_backbone_features(backbone_out)
        if self.model.directly_add_no_mem_embed:
            # Added to the lowest-resolution features during training on videos.
            vision_feats[-1] = vision_feats[-1] + self.model.no_mem_embed
        # (H*W, B, C) -> (B, C, H, W), in the input's dtype (sam2's neck upcasts some levels
        # to float32 in half-precision modes; a no-op in float32)
        feat_s0, feat_s1, image_embed = [
            feat.permute(1, 2, 0).reshape(images.shape[0], -1, h, w).to(images.dtype)
            for feat, (h, w) in zip(vision_feats, feat_sizes)
        ]
        return image_embed, feat_s0, feat_s1


def split_features(encoder_output: tuple[torch.Tensor, ...]) -> list[ImageFeatures]:
    """The encoder's (image_embed, feat_s0, feat_s1) for a batch -> one ImageFeatures per image."""
    image_embed, feat_s0, feat_s1 = encoder_output
    return [
        ImageFeatures(image_embed=image_embed[i : i + 1], high_res_feats=[feat_s0[i : i + 1], feat_s1[i : i + 1]])
        for i in range(len(image_embed))
    ]


def upscale_logits(low_res_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) logits -> (N, H, W), bilinear as sam2's postprocess_masks."""
    return F.interpolate(low_res_logits[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0]


def boxes_of_logits(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """XYXY boxes (N, 4) of the masks logits > threshold, [0, 0, 0, 0] for an empty mask: sam2's
    batched_mask_to_box, from two max-reductions of the logits instead of a boolean mask."""
    rows = logits.amax(dim=-1) > threshold  # (N, H): rows holding a pixel of the mask
    cols = logits.amax(dim=-2) > threshold  # (N, W)

    def first_and_last(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(present.shape[-1], device=present.device)
        return torch.where(present, index, present.shape[-1]).amin(dim=-1), (present * index).amax(dim=-1)

    (top, bottom), (left, right) = first_and_last(rows), first_and_last(cols)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * rows.any(dim=-1, keepdim=True)


# Masks upscaled to full resolution at a time: a few images' worth stays in the CPU's cache
# between the upscaling and the passes that read it (measured: README, "Performance").
UPSCALE_CHUNK = 4


def full_resolution_scores(
    low_res_logits: torch.Tensor, size: tuple[int, int], config: AMGConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stability scores and boxes of low-resolution logits (N, h, w) upscaled to `size`, as sam2
    computes them on its upscaled masks, a few masks at a time and never kept: (N,), (N, 4)."""
    stability, boxes = [], []
    for chunk in low_res_logits.split(UPSCALE_CHUNK):
        masks = upscale_logits(chunk, size)
        stability.append(calculate_stability_score(masks, config.mask_threshold, config.stability_score_offset))
        boxes.append(boxes_of_logits(masks, config.mask_threshold))
    if not stability:
        return low_res_logits.new_zeros(0), torch.zeros((0, 4), dtype=torch.long, device=low_res_logits.device)
    return torch.cat(stability), torch.cat(boxes)


class MaskGenerator:
    """The project's mask generator ("ao"): sam2's algorithm with less work, same answer."""

    def __init__(self, model: SAM2Base, config: AMGConfig) -> None:
        self.model = model
        self.config = config
        self.encoder = ImageEncoder(model)
        # Masks of prompts whose every IoU prediction fails the filter are never computed.
        gate = config.pred_iou_thresh if config.multimask_output and config.pred_iou_thresh > 0 else None
        self.decoder = FactoredPointDecoder(
            model, config.multimask_output, default_prompts_per_step(model), iou_gate=gate
        )
        self.point_grids = build_all_layer_point_grids(
            config.points_per_side, config.crop_n_layers, config.crop_n_points_downscale_factor
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    def with_config(self, config: AMGConfig) -> "MaskGenerator":
        return MaskGenerator(self.model, config)

    def generate(self, image: np.ndarray) -> list[RLE]:
        return self.generate_batch([image])[0]

    @torch.inference_mode()
    def generate_batch(self, images: list[np.ndarray]) -> list[list[RLE]]:
        """Several images with one image-encoder call for all of them (the whole images; crops,
        when crop_n_layers > 0, are encoded one by one). The rest runs image by image."""
        return [self.generate_from(image, features) for image, features in zip(images, self.embed_batch(images))]

    def generate_from(self, image: np.ndarray, image_features: ImageFeatures) -> list[RLE]:
        """The masks of an image whose encoder features are already computed."""
        orig_hw = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_hw, self.config.crop_n_layers, self.config.crop_overlap_ratio
        )
        candidates = self.image_candidates(image, image_features, crop_boxes, layer_idxs)
        return self.render_rles(candidates, crop_boxes, orig_hw)

    def image_candidates(
        self, image: np.ndarray, image_features: ImageFeatures, crop_boxes: list[list[int]], layer_idxs: list[int]
    ) -> Candidates:
        """The masks of every crop, with duplicates between crops removed."""
        candidates = Candidates.cat(
            [
                # Layer 0 is the whole image, already encoded.
                self.crop_candidates(image, box, layer, image_features if layer == 0 else None)
                for box, layer in zip(crop_boxes, layer_idxs)
            ]
        )
        if len(crop_boxes) > 1:
            # Between crops, prefer the mask from the smaller crop.
            scores = 1 / box_area(candidates.crop_boxes)
            keep = batched_nms(
                candidates.boxes.float(), scores, torch.zeros_like(scores), self.config.crop_nms_thresh
            )
            candidates = candidates.select(keep)
        return candidates

    def crop_candidates(
        self, image: np.ndarray, crop_box: list[int], layer_idx: int, features: ImageFeatures | None
    ) -> Candidates:
        """The masks of one crop (the whole image when there are no crop layers), after NMS."""
        x0, y0, x1, y1 = crop_box
        crop = image[y0:y1, x0:x1, :]
        crop_hw = crop.shape[:2]
        if features is None:
            features = self.embed(crop)

        # Point grid in crop pixels, (x, y) order, as float64 then float32 like sam2's.
        points = self.point_grids[layer_idx] * np.array(crop_hw)[None, ::-1]
        batch = self.config.points_per_batch
        candidates = Candidates.cat(
            [
                self.batch_candidates(features, points[start : start + batch], crop_box, crop_hw, image.shape[:2])
                for start in range(0, len(points), batch)
            ]
        )

        # Remove duplicates within this crop (boxes still in crop coordinates, as sam2).
        keep = batched_nms(
            candidates.boxes.float(),
            candidates.iou_preds,
            torch.zeros_like(candidates.iou_preds),
            self.config.box_nms_thresh,
        )
        kept = candidates.select(keep)
        # Into image coordinates.
        return replace(kept, boxes=uncrop_boxes_xyxy(kept.boxes, crop_box), points=uncrop_points(kept.points, crop_box))

    def embed(self, image: np.ndarray) -> ImageFeatures:
        """Runs the image encoder, as sam2's SAM2ImagePredictor.set_image."""
        return self.embed_batch([image])[0]

    def embed_batch(self, images: list[np.ndarray]) -> list[ImageFeatures]:
        """One image-encoder call for several images (each resized to the model's input)."""
        model_input = torch.cat([image_to_input(image, self.model.image_size) for image in images]).to(self.device)
        return split_features(self.encoder(model_input))

    def predict_points(
        self, features: ImageFeatures, points: torch.Tensor, crop_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder for single foreground points.

        Arguments:
          points: (B, 2) float32 pixel coordinates (x, y) in the crop.
        Returns:
          low-resolution mask logits (B, M, h, w) and predicted IoUs (B, M), M = 3 with
          multimask output, else 1.
        """
        return self.decoder(features.image_embed, *features.high_res_feats, self.model_coords(points, crop_hw))

    def model_coords(self, points: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
        """Pixels -> [0, 1] -> the model's input frame, as SAM2Transforms.transform_coords."""
        h, w = crop_hw
        coords = points / torch.tensor([w, h], dtype=torch.float32, device=points.device)
        return coords * self.model.image_size

    def batch_candidates(
        self,
        features: ImageFeatures,
        points: np.ndarray,
        crop_box: list[int],
        crop_hw: tuple[int, int],
        orig_hw: tuple[int, int],
    ) -> Candidates:
        """Masks of one batch of points that pass the IoU, stability and crop-edge filters."""
        cfg = self.config
        points = torch.as_tensor(points, dtype=torch.float32, device=self.device)
        low_res_logits, iou_preds = self.predict_points(features, points, crop_hw)
        masks_per_point = low_res_logits.shape[1]
        low_res_logits = low_res_logits.flatten(0, 1)  # (B*M, h, w)
        iou_preds = iou_preds.flatten(0, 1)
        points = points.repeat_interleave(masks_per_point, dim=0)

        # Filter by predicted IoU before upscaling: only survivors are upscaled.
        if cfg.pred_iou_thresh > 0.0:
            keep = iou_preds > cfg.pred_iou_thresh
            low_res_logits, iou_preds, points = low_res_logits[keep], iou_preds[keep], points[keep]

        # Filter by stability, on full-resolution logits (as sam2, so the scores are the same).
        stability, boxes = full_resolution_scores(low_res_logits, crop_hw, cfg)
        if cfg.stability_score_thresh > 0.0:
            keep = stability >= cfg.stability_score_thresh
            low_res_logits, iou_preds, points = low_res_logits[keep], iou_preds[keep], points[keep]
            stability, boxes = stability[keep], boxes[keep]

        # Drop masks that touch a crop's edge where it is not the image's edge.
        keep = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_hw[1], orig_hw[0]])
        iou_preds = iou_preds[keep]
        return Candidates(
            low_res_logits=low_res_logits[keep],
            iou_preds=iou_preds,
            stability_scores=stability[keep],
            boxes=boxes[keep],
            points=points[keep],
            crop_boxes=torch.tensor([crop_box], device=self.device).expand(len(iou_preds), 4),
        )

    def render_masks(
        self, candidates: Candidates, crop_boxes: list[list[int]], orig_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Upscales candidates' logits into their crops of the image: (N, H, W) bool."""
        masks = torch.zeros((len(candidates), *orig_hw), dtype=torch.bool, device=self.device)
        for crop_box in crop_boxes:
            x0, y0, x1, y1 = crop_box
            in_crop = (candidates.crop_boxes == torch.tensor(crop_box, device=self.device)).all(dim=1)
            logits = upscale_logits(candidates.low_res_logits[in_crop], (y1 - y0, x1 - x0))
            masks[in_crop, y0:y1, x0:x1] = logits > self.config.mask_threshold
        return masks

    def render_rles(
        self, candidates: Candidates, crop_boxes: list[list[int]], orig_hw: tuple[int, int]
    ) -> list[RLE]:
        """Full-resolution masks of the kept candidates, as RLE, in their order.

        Chunks of points_per_batch masks bound the memory; run lengths stay on the device
        until the single transfer in run_lengths_to_rles.
        """
        chunk = self.config.points_per_batch
        run_lengths = [
            rle_run_lengths(self.render_masks(candidates.select(slice(start, start + chunk)), crop_boxes, orig_hw))
            for start in range(0, len(candidates), chunk)
        ]
        return run_lengths_to_rles(run_lengths, *orig_hw)
