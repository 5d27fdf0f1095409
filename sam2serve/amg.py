"""Automatic mask generation: a grid of point prompts over the image, the SAM2 mask decoder on
every point, filtering by predicted IoU and stability, box NMS, masks out as COCO RLE.

Two generators with one interface (`generate(image) -> list of RLE`):
- `ReferenceMaskGenerator`: the `sam2` package's own SAM2AutomaticMaskGenerator, its numbers
  unchanged: its predictor's feature sizes fitted to the model's input size (the official
  models' are unchanged), a check before each of its crops and point batches that stops a
  request given up, and its crops' boxes shaped where a crop keeps no mask (with_crop_boxes_shaped).
- `MaskGenerator`: the project's recipe, the same algorithm and the same numbers with less
  work. Per point batch it filters by predicted IoU before upscaling, keeps survivors as
  low-resolution logits, and only after NMS upscales the masks that are kept, encoding them all
  at once on the device with one copy to the host.

The recipe knows nothing of compilation: it runs three `Kernels` (input preparation, image
encoder, point decoder), by default the eager modules of model.py, whose factored decoder does
the image-side work once per image instead of once per prompt and computes no mask for a prompt
whose every predicted IoU fails the filter. The fast modes hand it compiled or exported kernels
(fast.py).
"""

import importlib.util
import logging
import math
import numbers
import threading
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable, Iterable, Protocol

import numpy as np
import scipy.ndimage
import torch
from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator
from sam2.modeling.sam2_base import SAM2Base
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.amg import (
    MaskData,
    area_from_rle,
    box_xyxy_to_xywh,
    build_all_layer_point_grids,
    calculate_stability_score,
    generate_crop_boxes,
    is_box_near_crop_edge,
    uncrop_boxes_xyxy,
    uncrop_points,
)
from torch.profiler import record_function
from torchvision.ops.boxes import batched_nms, box_area

from .model import (
    FactoredPointDecoder,
    ImageEncoder,
    ImageFeatures,
    default_prompts_per_step,
    model_coords,
    refine_with_mask_input,
    split_features,
)
from .preprocess import image_to_input
from .rle import RLE, rle_run_lengths, run_lengths_to_rles
from .upscale import boxes_of_presence, masks_above, stability_and_boxes, upscale_logits, use_cells

log = logging.getLogger(__name__)


# Far beyond any use (sam2's default is 32): a grid of 100000 per side would ask for 75 GiB
# before the first prompt.
MAX_POINTS_PER_SIDE = 1024
# Crop layer n cuts the image into 4**n crops, each segmented like the whole image: 4 layers are
# 341 image encodings per image already (sam2's own examples use 1); 50 built crop boxes forever.
MAX_CROP_N_LAYERS = 4
MAX_STABILITY_SCORE_OFFSET = 1000.0


# Python's and numpy's booleans: the values of a flag, and no number (True is an int to Python).
BOOLEANS = (bool, np.bool_)
# An AMGConfig field's annotation -> the values it takes (numpy's numbers too).
SETTING_KINDS = {int: numbers.Integral, float: numbers.Real, bool: BOOLEANS}
KIND_WORDS = {numbers.Integral: "a whole number", numbers.Real: "a number", BOOLEANS: "True or False"}


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
    use_m2m: bool = False  # refine every mask once more, its own low-resolution logits as mask input
    min_mask_region_area: int = 0  # holes and specks of at most this many low-resolution pixels removed

    def __post_init__(self) -> None:
        # Of its type first: a library caller's use_m2m="false" turned m2m on, points_per_side=2.5 was taken
        for setting in fields(self):
            value, kind = getattr(self, setting.name), SETTING_KINDS[setting.type]
            if isinstance(value, BOOLEANS) != (kind is BOOLEANS) or not isinstance(value, kind):
                raise TypeError(f"{setting.name} must be {KIND_WORDS[kind]}, got {value!r}")
        for name in ("points_per_side", "points_per_batch", "crop_n_points_downscale_factor"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.points_per_side > MAX_POINTS_PER_SIDE:
            raise ValueError(f"points_per_side must be at most {MAX_POINTS_PER_SIDE} (a million point prompts), "
                             f"got {self.points_per_side}")
        if self.points_per_batch > MAX_POINTS_PER_SIDE**2:  # the largest grid in one batch; a compiled decoder's
            # static batch of 1e20 ended in an overflow's traceback
            raise ValueError(f"points_per_batch must be at most {MAX_POINTS_PER_SIDE**2} (the largest grid), "
                             f"got {self.points_per_batch}")
        for name in ("crop_n_layers", "min_mask_region_area"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.crop_n_layers > MAX_CROP_N_LAYERS:
            raise ValueError(f"crop_n_layers must be at most {MAX_CROP_N_LAYERS} (layer n: 4**n crops, each "
                             f"segmented like the whole image), got {self.crop_n_layers}")
        # Layer n's grid has points_per_side / factor**n points a side (sam2's int()): none fails each image.
        if int(self.points_per_side / self.crop_n_points_downscale_factor ** self.crop_n_layers) < 1:
            raise ValueError(f"crop_n_points_downscale_factor {self.crop_n_points_downscale_factor} leaves crop layer "
                             f"{self.crop_n_layers} no point of points_per_side {self.points_per_side}")
        # Scores and IoUs are within [0, 1] (SAM2.1 predicts IoUs through a sigmoid): a threshold
        # above 1 would keep no mask, without a word.
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {getattr(self, name)}")
        # (a NaN threshold keeps no mask: every comparison with it is false)
        if not math.isfinite(self.mask_threshold):
            raise ValueError(f"mask_threshold must be a finite number, got {self.mask_threshold}")
        # The stability score compares the mask at mask_threshold +- the offset: at 0 or below,
        # scores above 1 and 0/0; beyond float32's reach, 0/0 too. Logits stay within tens.
        if not 0.0 < self.stability_score_offset <= MAX_STABILITY_SCORE_OFFSET:
            raise ValueError(f"stability_score_offset must be above 0 and at most {MAX_STABILITY_SCORE_OFFSET:g}, "
                             f"got {self.stability_score_offset}")
        if not 0.0 <= self.crop_overlap_ratio < 1.0:
            raise ValueError(f"crop_overlap_ratio must be within [0, 1), got {self.crop_overlap_ratio}")


# What one request may change of the server's settings: the filters after the decoder. They change
# neither the kernels (compiled for the grid and batch sizes) nor the prompts; looser ones keep
# more masks, which take longer to render. The grid, crops and batch sizes stay the server's.
REQUEST_SETTINGS = ("pred_iou_thresh", "stability_score_thresh", "stability_score_offset", "box_nms_thresh")


class Interrupted(RuntimeError):
    """The generator's should_stop() said stop, before a crop or a batch of point prompts (ao:
    or a chunk of the masks it renders): nobody waits for these masks any more."""


def stop_if_asked(should_stop: Callable[[], bool] | None) -> None:
    if should_stop is not None and should_stop():
        raise Interrupted("stopped before a crop, a batch of point prompts or a chunk of masks: nobody waits for "
                          "these masks any more")


class Generator(Protocol):
    config: AMGConfig
    # Asked before each crop and batch of point prompts (ao: and each chunk of masks rendered),
    # where set: True ends the call with Interrupted (the server's: every request of the call has
    # gone, its client or its time).
    should_stop: Callable[[], bool] | None

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

    def points_per_batch_on(self, height: int, width: int) -> int:
        """The point prompts per decoder call on an image of this size (config.points_per_batch,
        or fewer: the baseline's on large images)."""
        ...

    def annotate(self, image: np.ndarray) -> list[dict]:
        """generate() with each mask's record as sam2's generate() writes it: segmentation (RLE),
        area, bbox and crop_box (XYWH), predicted_iou, stability_score, point_coords."""
        ...

    def annotate_batch(self, images: list[np.ndarray]) -> list[list[dict]]:
        """annotate() of each image, sharing work as generate_batch does."""
        ...


def with_settings(generator: Generator, settings: dict[str, float]) -> Generator:
    """The generator under a request's own REQUEST_SETTINGS (none given: the generator itself).
    Cheap: the same model and kernels; ao's eager decoder is rebuilt for its IoU gate."""
    if not settings:
        return generator
    if unknown := set(settings) - set(REQUEST_SETTINGS):
        raise ValueError(f"not settings a request may change: {sorted(unknown)}")
    return generator.with_config(replace(generator.config, **settings))


def fit_predictor_to_model(predictor: SAM2ImagePredictor) -> SAM2ImagePredictor:
    """Sets the predictor's feature-map sizes from the model's input size.

    sam2 hard-codes them for the official 1024-pixel input; the micro model takes 256.
    For the official sizes this changes nothing.
    """
    size = predictor.model.image_size
    predictor._bb_feat_sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    return predictor


def image_predictor(model: SAM2Base) -> SAM2ImagePredictor:
    """sam2's single-image predictor (the reference for point prompts) for any input size."""
    return fit_predictor_to_model(SAM2ImagePredictor(model))


def checked_images(images: Iterable[np.ndarray]) -> list[np.ndarray]:
    """The images as a list, each (H, W, 3) uint8 RGB, as sam2's generator documents them; other
    arrays are refused in words. (A float image was read as [0, 1] by the eager kernels and as
    [0, 255] by the compiled ones: other masks without a word; gray or RGBA failed deep in torch;
    an image of no pixels too.)"""
    if isinstance(images, np.ndarray):
        raise TypeError("expected a list of images; for one image call generate() or annotate()")
    images = list(images)
    for image in images:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            what = (f"an array of {image.dtype} of shape {image.shape}" if isinstance(image, np.ndarray)
                    else type(image).__name__)
            raise TypeError(f"expected an (H, W, 3) uint8 RGB image (sam2serve.preprocess.decode_image gives one from "
                            f"a file's bytes), got {what}")
        if image.size == 0:  # failed in torch's resize (ao) or in sam2's step after its NMS (the baseline)
            raise ValueError(f"an image of no pixels (shape {image.shape}): nothing to segment")
    # A view such as OpenCV's BGR[..., ::-1] is copied: torch takes no negative strides.
    return [np.ascontiguousarray(image) for image in images]


def baseline_leaves_out(config: AMGConfig) -> str | None:
    """What of config the baseline (sam2's generator) does not do here, or None: sam2 fills holes
    and removes specks (min_mask_region_area) only with its optional CUDA extension."""
    if config.min_mask_region_area > 0 and importlib.util.find_spec("sam2._C") is None:
        return "sam2 skips min_mask_region_area without its CUDA extension (not built here: SAM2_BUILD_CUDA=0)"
    return None


# What sam2's generator takes per point prompt of a batch and pixel of the image: the point's 3
# masks upscaled to the image in float32, and copies of them (2.3 KB a pixel at 64 points on a
# CPU), and what a batch may take at most: points per batch are cut on large images (a 12 MP
# photo's batch of 64 asked for 9 GB and the server was killed); the masks are the same, each
# point decoded on its own, their scores to float rounding (a batch of another size adds in
# another order: a predicted IoU a last float32 bit apart), and the cut is logged.
REFERENCE_BYTES_PER_POINT_PIXEL = 36
REFERENCE_BATCH_BYTES = 4 << 30


class ReferenceMaskGenerator:
    """The `sam2` package's SAM2AutomaticMaskGenerator, its numbers unchanged: the baseline."""

    def __init__(self, model: SAM2Base, config: AMGConfig, warn: bool = True) -> None:
        self.config = config
        self.generator = SAM2AutomaticMaskGenerator(
            model, **asdict(config), output_mode="uncompressed_rle"
        )
        fit_predictor_to_model(self.generator.predictor)
        self.lock = threading.Lock()  # two threads' images in sam2's one predictor gave one the other's masks
        self.should_stop: Callable[[], bool] | None = None
        for step in ("_process_crop", "_process_batch"):  # sam2's steps: a crop (its encoding first), a batch of points
            setattr(self.generator, step, self.unless_stopped(getattr(self.generator, step)))
        self.generator._process_crop = without_empty_crops(with_crop_boxes_shaped(self.generator._process_crop))
        left_out = baseline_leaves_out(config)
        if left_out and warn:
            log.warning("baseline: %s; ao and the fast modes apply it on every device", left_out)

    def unless_stopped(self, step: Callable) -> Callable:
        def run(*args, **kwargs):
            stop_if_asked(self.should_stop)
            return step(*args, **kwargs)

        return run

    def generate(self, image: np.ndarray) -> list[RLE]:
        return [record["segmentation"] for record in self.annotate(image)]

    def generate_batch(self, images: list[np.ndarray]) -> list[list[RLE]]:
        return [self.generate(image) for image in checked_images(images)]  # sam2's generator takes one image

    def with_config(self, config: AMGConfig) -> "ReferenceMaskGenerator":
        # (warned once, when the server's was built: a request's settings leave that one alone)
        warn = config.min_mask_region_area != self.config.min_mask_region_area
        return ReferenceMaskGenerator(self.generator.predictor.model, config, warn)

    def points_per_batch_on(self, height: int, width: int) -> int:
        return max(1, min(self.config.points_per_batch,
                          REFERENCE_BATCH_BYTES // (REFERENCE_BYTES_PER_POINT_PIXEL * height * width)))

    def annotate(self, image: np.ndarray) -> list[dict]:
        (image,) = checked_images([image])
        with self.lock:  # sam2's generator holds its image's features between its steps
            self.generator.points_per_batch = self.points_per_batch_on(*image.shape[:2])
            if self.generator.points_per_batch < self.config.points_per_batch:
                log.info("baseline: %d points per batch instead of %d on this %dx%d image (sam2 upscales each "
                         "point's masks to it)", self.generator.points_per_batch, self.config.points_per_batch,
                         image.shape[1], image.shape[0])
            return self.generator.generate(image)

    def annotate_batch(self, images: list[np.ndarray]) -> list[list[dict]]:
        return [self.annotate(image) for image in checked_images(images)]


def with_crop_boxes_shaped(process_crop: Callable) -> Callable:
    """sam2's _process_crop, its crop_boxes (N, 4) also when it keeps no mask: sam2 makes them
    torch.tensor([]), of shape (0,), and with crops (crop_n_layers) and no mask kept in any,
    its generate() failed on them (IndexError in box_area) where the answer is no masks."""

    def run(*args, **kwargs):
        data = process_crop(*args, **kwargs)
        data["crop_boxes"] = data["crop_boxes"].reshape(-1, 4)
        return data

    return run


def has_pixels(crop_box: list[int]) -> bool:
    """Whether a crop (XYXY) holds a pixel: sam2's crop layers of an image a few pixels high or
    wide include crops of none, on which its generator failed (a resize to 0 pixels)."""
    x0, y0, x1, y1 = crop_box
    return x1 > x0 and y1 > y0


def without_empty_crops(process_crop: Callable) -> Callable:
    """sam2's _process_crop, which gives a crop without pixels no masks (MaskData.cat adds
    nothing of an empty MaskData) instead of failing; the other crops' numbers are unchanged."""

    def run(image, crop_box, *args, **kwargs):
        return process_crop(image, crop_box, *args, **kwargs) if has_pixels(crop_box) else MaskData()

    return run


EAGER_KERNELS = "eager (ao's modules)"


@dataclass(frozen=True)
class Kernels:
    """What MaskGenerator runs on the device, as three functions of tensors.

    The eager modules by default (eager_kernels); the fast modes pass compiled or exported ones
    built for static shapes, and say which (a generator refuses settings they do not fit).
    """

    prepare_input: Callable  # (H, W, 3) uint8 RGB -> (1, 3, R, R) model input on the device
    encoder: Callable  # (B, 3, R, R) -> (image_embed, feat_s0, feat_s1)
    decoder: Callable  # (image_embed, feat_s0, feat_s1, coords (P, 2)) -> float32 (logits (P, M, h, w), IoUs (P, M))
    dtype: torch.dtype = torch.float32  # the model's
    points_per_batch: int | None = None  # the decoder's static batch size, if it has one
    multimask_output: bool | None = None  # what the decoder is built for, if fixed
    description: str = EAGER_KERNELS  # how they were built, for /health and the logs


def eager_kernels(model: SAM2Base, config: AMGConfig) -> Kernels:
    """ao's kernels: sam2's preprocessing on the host, the image encoder, and the factored point
    decoder, which computes no mask for a prompt whose every predicted IoU fails the filter.

    They run in the image encoder's dtype: float32 for ao; bfloat16 where fast_furious runs them
    on a CPU (the model cast by sam2serve.fast.prepare_model), outputs still float32."""
    gate = config.pred_iou_thresh if config.multimask_output and config.pred_iou_thresh > 0 else None
    if config.use_m2m:  # the IoU filter applies to the refined masks: every mask is computed
        gate = None
    dtype = next(model.image_encoder.parameters()).dtype
    decoder = FactoredPointDecoder(model, config.multimask_output, default_prompts_per_step(model), iou_gate=gate)

    def prepare_input(image: np.ndarray) -> torch.Tensor:
        return image_to_input(image, model.image_size).to(model.device, dtype)

    def decoder_in_float32(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, iou_preds = decoder(*inputs)
        return logits.float(), iou_preds.float()

    return Kernels(
        prepare_input=prepare_input,
        encoder=ImageEncoder(model),
        decoder=decoder if dtype == torch.float32 else decoder_in_float32,
        dtype=dtype,
    )


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


class MaskGenerator:
    """The project's mask generator ("ao" with the eager kernels): sam2's algorithm with less
    work, same answer. `kernels` replace the eager ones (fast modes). Its stages are labelled
    for torch.profiler: amg.encode, amg.decode, amg.scores, amg.nms, amg.masks (the benchmark's
    --profile)."""

    def __init__(self, model: SAM2Base, config: AMGConfig, kernels: Kernels | None = None) -> None:
        if kernels is not None and (
            kernels.points_per_batch not in (None, config.points_per_batch)
            or kernels.multimask_output not in (None, config.multimask_output)
        ):
            raise ValueError(
                f"kernels built for {kernels.points_per_batch} points per batch and multimask output "
                f"{kernels.multimask_output}, not {config.points_per_batch} and {config.multimask_output}"
            )
        self.model = model
        self.config = config
        self.given_kernels = kernels
        self.kernels = kernels or eager_kernels(model, config)
        # Called with a whole image and its encoder features once computed, when the image was
        # encoded alone (the server keeps them for an /embed of it: protocol.share_encodings).
        self.on_features: Callable[[np.ndarray, ImageFeatures], None] | None = None
        # Called when a call on the model ran out of memory, before it is tried again: frees what
        # is kept only in case it is wanted (the server's kept features), returns the bytes freed.
        self.on_out_of_memory: Callable[[], int] | None = None
        self.should_stop: Callable[[], bool] | None = None  # Generator's
        self.point_grids = build_all_layer_point_grids(
            config.points_per_side, config.crop_n_layers, config.crop_n_points_downscale_factor
        )

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def encodes_as_sam2(self) -> bool:
        """Whether its encoder features are sam2's SAM2ImagePredictor's, bit for bit (the eager
        kernels in float32: ao's; compiled or half-precision ones differ in the last bits)."""
        return self.given_kernels is None and self.kernels.dtype == torch.float32

    def with_config(self, config: AMGConfig) -> "MaskGenerator":
        """The same model, kernels and hooks under other settings (eager kernels follow the
        settings; compiled ones must fit them)."""
        generator = MaskGenerator(self.model, config, self.given_kernels)
        generator.on_features, generator.on_out_of_memory = self.on_features, self.on_out_of_memory
        return generator

    def points_per_batch_on(self, height: int, width: int) -> int:
        return self.config.points_per_batch  # its masks are upscaled in chunks that bound the memory

    def generate(self, image: np.ndarray) -> list[RLE]:
        return self.generate_batch([image])[0]

    @torch.inference_mode()
    def generate_batch(self, images: list[np.ndarray]) -> list[list[RLE]]:
        """Several images with one image-encoder call for all of them (the whole images; crops,
        when crop_n_layers > 0, are encoded one by one). The rest runs image by image."""
        images = checked_images(images)
        return [self.generate_from(image, features) for image, features in zip(images, self.encode(images))]

    def generate_from(self, image: np.ndarray, image_features: ImageFeatures) -> list[RLE]:
        """The masks of an image whose encoder features are already computed."""
        return self.masks_and_candidates(image, image_features)[0]

    def annotate(self, image: np.ndarray) -> list[dict]:
        return self.annotate_batch([image])[0]

    @torch.inference_mode()
    def annotate_batch(self, images: list[np.ndarray]) -> list[list[dict]]:
        """Each image's mask records, with one image-encoder call for all of them."""
        images = checked_images(images)
        return [self.records(image, features) for image, features in zip(images, self.encode(images))]

    def records(self, image: np.ndarray, image_features: ImageFeatures) -> list[dict]:
        """The masks of an image as sam2's generate() records (Generator.annotate)."""
        rles, candidates = self.masks_and_candidates(image, image_features)
        return [
            {
                "segmentation": rle,
                "area": area_from_rle(rle),
                "bbox": box_xyxy_to_xywh(candidates.boxes[index]).float().tolist(),  # floats, as sam2's
                "predicted_iou": candidates.iou_preds[index].item(),
                "point_coords": [candidates.points[index].tolist()],
                "stability_score": candidates.stability_scores[index].item(),
                "crop_box": box_xyxy_to_xywh(candidates.crop_boxes[index]).float().tolist(),
            }
            for index, rle in enumerate(rles)
        ]

    def masks_and_candidates(self, image: np.ndarray, image_features: ImageFeatures) -> tuple[list[RLE], Candidates]:
        """The RLE masks and the candidates they come from, in the order NMS keeps them."""
        orig_hw = image.shape[:2]
        crop_boxes, layer_idxs = generate_crop_boxes(
            orig_hw, self.config.crop_n_layers, self.config.crop_overlap_ratio
        )
        candidates = self.image_candidates(image, image_features, crop_boxes, layer_idxs)
        return self.render_rles(candidates, crop_boxes, orig_hw), candidates

    def image_candidates(
        self, image: np.ndarray, image_features: ImageFeatures, crop_boxes: list[list[int]], layer_idxs: list[int]
    ) -> Candidates:
        """The masks of every crop, with duplicates between crops removed."""
        candidates = Candidates.cat(
            [
                # Layer 0 is the whole image, already encoded.
                self.crop_candidates(image, box, layer, image_features if layer == 0 else None)
                for box, layer in zip(crop_boxes, layer_idxs)
                if has_pixels(box)  # (counted below all the same, as sam2 counts them)
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
        stop_if_asked(self.should_stop)  # before each crop (its encoding, where not done) as before each batch
        if features is None:
            features = self.embed(crop)

        # Point grid in crop pixels, (x, y) order, as float64 then float32 like sam2's.
        points = self.point_grids[layer_idx] * np.array(crop_hw)[None, ::-1]
        batch = self.config.points_per_batch
        parts = []
        for start in range(0, len(points), batch):
            stop_if_asked(self.should_stop)
            batch_points = points[start : start + batch]
            parts.append(self.batch_candidates(features, batch_points, crop_box, crop_hw, image.shape[:2]))
        candidates = Candidates.cat(parts)

        # Remove duplicates within this crop (boxes still in crop coordinates, as sam2).
        with record_function("amg.nms"):
            keep = batched_nms(
                candidates.boxes.float(),
                candidates.iou_preds,
                torch.zeros_like(candidates.iou_preds),
                self.config.box_nms_thresh,
            )
        kept = candidates.select(keep)
        # Into image coordinates.
        return replace(kept, boxes=uncrop_boxes_xyxy(kept.boxes, crop_box), points=uncrop_points(kept.points, crop_box))

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
        if cfg.use_m2m:  # as sam2: each mask refined with its point and its clamped logits as mask input
            points = points.repeat_interleave(masks_per_point, dim=0)
            low_res_logits, iou_preds = self.refine(features, points, low_res_logits.flatten(0, 1), crop_hw)
            low_res_logits, iou_preds, masks_per_point = low_res_logits[:, None], iou_preds[:, None], 1
        n = masks_per_point * len(points)
        candidates = Candidates(
            low_res_logits=low_res_logits.flatten(0, 1),  # (B*M, h, w)
            iou_preds=iou_preds.flatten(0, 1),
            stability_scores=iou_preds.new_zeros(n),  # set below, for the masks that pass the IoU filter
            boxes=torch.zeros((n, 4), dtype=torch.long, device=self.device),  # likewise
            points=points.repeat_interleave(masks_per_point, dim=0),
            crop_boxes=torch.tensor([crop_box], device=self.device).expand(n, 4),
        )

        # Filter by predicted IoU before upscaling: only survivors are upscaled.
        if cfg.pred_iou_thresh > 0.0:
            candidates = candidates.select(candidates.iou_preds > cfg.pred_iou_thresh)
        if cfg.min_mask_region_area > 0:
            filled = remove_small_regions(
                candidates.low_res_logits, cfg.min_mask_region_area, PREDICTOR_MASK_THRESHOLD)
            candidates = replace(candidates, low_res_logits=filled)

        # Stability and boxes on full-resolution logits (as sam2, so the scores are the same).
        with record_function("amg.scores"):
            stability, boxes = full_resolution_scores(candidates.low_res_logits, crop_hw, cfg)
        candidates = replace(candidates, stability_scores=stability, boxes=boxes)
        if cfg.stability_score_thresh > 0.0:
            candidates = candidates.select(stability >= cfg.stability_score_thresh)

        # Drop masks that touch a crop's edge where it is not the image's edge.
        return candidates.select(~is_box_near_crop_edge(candidates.boxes, crop_box, [0, 0, orig_hw[1], orig_hw[0]]))

    def render_rles(
        self, candidates: Candidates, crop_boxes: list[list[int]], orig_hw: tuple[int, int]
    ) -> list[RLE]:
        """Full-resolution masks of the kept candidates, as RLE, in their order.

        Chunks of points_per_batch masks (on a GPU, at most masks_per_upscale) bound the memory;
        run lengths stay on the device until the single transfer in run_lengths_to_rles.
        """
        chunk = self.config.points_per_batch
        if self.device.type != "cpu":
            chunk = min(chunk, masks_per_upscale(self.device, orig_hw))
        with record_function("amg.masks"):
            run_lengths = []
            for start in range(0, len(candidates), chunk):
                stop_if_asked(self.should_stop)  # thousands of masks kept (loose filters) take a while
                chunk_masks = self.render_masks(candidates.select(slice(start, start + chunk)), crop_boxes, orig_hw)
                run_lengths.append(rle_run_lengths(chunk_masks))
            return run_lengths_to_rles(run_lengths, *orig_hw)

    def render_masks(
        self, candidates: Candidates, crop_boxes: list[list[int]], orig_hw: tuple[int, int]
    ) -> torch.Tensor:
        """Upscales candidates' logits into their crops of the image: (N, H, W) bool."""
        masks = torch.zeros((len(candidates), *orig_hw), dtype=torch.bool, device=self.device)
        for crop_box in filter(has_pixels, crop_boxes):
            x0, y0, x1, y1 = crop_box
            in_crop = (candidates.crop_boxes == torch.tensor(crop_box, device=self.device)).all(dim=1)
            masks[in_crop, y0:y1, x0:x1] = masks_above(
                candidates.low_res_logits[in_crop], (y1 - y0, x1 - x0), self.config.mask_threshold)
        return masks

    # Model helpers.

    def embed_batch(self, images: list[np.ndarray]) -> list[ImageFeatures]:
        """One image-encoder call for several images (each resized to the model's input)."""
        if not images:  # (an empty batch: no call)
            return []
        with record_function("amg.encode"):
            model_input = torch.cat([self.kernels.prepare_input(image) for image in images])
            return split_features(self.kernels.encoder(model_input))

    def encode(self, images: list[np.ndarray]) -> list[ImageFeatures]:
        """embed_batch, and a lone image's features handed to on_features (an image encoded in a
        batch with others may get other last bits: kernels are chosen by shape)."""
        features = self.embed_batch(images)
        if self.on_features is not None and len(images) == 1:
            self.on_features(images[0], features[0])
        return features

    def embed(self, image: np.ndarray) -> ImageFeatures:
        """Runs the image encoder, as sam2's SAM2ImagePredictor.set_image."""
        return self.embed_batch([image])[0]

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
        with record_function("amg.decode"):
            return self.kernels.decoder(features.image_embed, *features.high_res_feats,
                                        self.model_coords(points, crop_hw))

    def refine(
        self, features: ImageFeatures, points: torch.Tensor, low_res_logits: torch.Tensor, crop_hw: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """sam2's mask-to-mask refinement (use_m2m), points_per_batch masks per decoder call:
        (refined logits (N, h, w), their IoUs (N,))."""
        coords = self.model_coords(points, crop_hw)
        mask_inputs = torch.clamp(low_res_logits.float(), -32.0, 32.0)  # sam2 keeps them clamped
        step = self.config.points_per_batch
        refined = [
            refine_with_mask_input(self.model, features, coords[start : start + step], mask_inputs[start : start + step])
            for start in range(0, len(coords), step)
        ]
        return torch.cat([logits for logits, _ in refined]), torch.cat([ious for _, ious in refined])

    def model_coords(self, points: torch.Tensor, crop_hw: tuple[int, int]) -> torch.Tensor:
        """Pixels -> [0, 1] -> the model's input frame, as SAM2Transforms.transform_coords."""
        return model_coords(points, crop_hw, self.model.image_size)


# sam2's generator builds its predictor without its own mask_threshold: the predictor finds holes
# and specks at its default, 0, whatever the generator's mask_threshold (remove_small_regions).
PREDICTOR_MASK_THRESHOLD = 0.0


def remove_small_regions(low_res_logits: torch.Tensor, max_area: int, threshold: float) -> torch.Tensor:
    """sam2's min_mask_region_area, as its predictor applies it to every mask before upscaling:
    in each low-resolution mask (N, h, w), the connected regions (8-connectivity) of at most
    max_area pixels are flipped, background ones (holes, and a background that small) to
    threshold + 10, foreground ones (specks) to threshold - 10, both found on the logits as given.

    sam2 labels the regions with its optional CUDA extension and skips the step, with a warning,
    where the extension is not built (SAM2_BUILD_CUDA=0, as this project installs it); here
    scipy labels them on the host, on every device, for the masks that pass the IoU filter.
    """
    if len(low_res_logits) == 0:
        return low_res_logits
    foreground = (low_res_logits > threshold).cpu().numpy()
    holes = torch.from_numpy(small_regions(~foreground, max_area)).to(low_res_logits.device)
    specks = torch.from_numpy(small_regions(foreground, max_area)).to(low_res_logits.device)
    filled = torch.where(holes, threshold + 10.0, low_res_logits)
    return torch.where(specks, threshold - 10.0, filled)


def small_regions(masks: np.ndarray, max_area: int) -> np.ndarray:
    """(N, h, w) bool -> the pixels of each mask's connected regions (8-connectivity) of at
    most max_area pixels. One labelling of all masks: the structure connects no two masks."""
    within_one_mask = np.zeros((3, 3, 3), dtype=bool)
    within_one_mask[1] = True
    labels, _ = scipy.ndimage.label(masks, structure=within_one_mask)
    small = np.bincount(labels.ravel()) <= max_area
    small[0] = False  # label 0: not in the regions
    return small[labels]


def boxes_of_logits(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """XYXY boxes (N, 4) of the masks logits > threshold, [0, 0, 0, 0] for an empty mask: sam2's
    batched_mask_to_box, from two max-reductions of the logits instead of a boolean mask."""
    return boxes_of_presence(logits.amax(dim=-1) > threshold, logits.amax(dim=-2) > threshold)


# Masks upscaled to full resolution at a time. On a CPU a few images' worth stays in the cache
# between the upscaling and the passes that read it (measured: docs/performance.md). A GPU takes
# as many as fit in UPSCALE_BYTES of float32 pixels: fewer, larger kernels, and memory bounded on
# images of any size.
UPSCALE_CHUNK = 4
UPSCALE_BYTES = 2**30
CELL_CHUNK = 16  # masks at a time cell by cell: memory in proportion to their edges


def masks_per_upscale(device: torch.device, size: tuple[int, int]) -> int:
    """How many masks to upscale to `size` at a time on the device."""
    if device.type == "cpu":
        return UPSCALE_CHUNK
    return max(1, UPSCALE_BYTES // (4 * size[0] * size[1]))


def full_resolution_scores(
    low_res_logits: torch.Tensor, size: tuple[int, int], config: AMGConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stability scores and boxes of low-resolution logits (N, h, w) upscaled to `size`, as sam2
    computes them on its upscaled masks, never kept: (N,), (N, 4). Cell by cell, pixels only at
    edges (upscale.stability_and_boxes), where upscale.use_cells (on a CPU, upscaling enough);
    otherwise a few masks upscaled at a time. No masks: split gives one empty chunk, and empty
    answers."""
    stability, boxes = [], []
    cell_by_cell = use_cells(low_res_logits, size)
    chunk_size = CELL_CHUNK if cell_by_cell else masks_per_upscale(low_res_logits.device, size)
    for chunk in low_res_logits.split(chunk_size):
        if cell_by_cell:
            chunk_stability, chunk_boxes = stability_and_boxes(
                chunk, size, config.mask_threshold, config.stability_score_offset)
            stability.append(chunk_stability)
            boxes.append(chunk_boxes)
            continue
        masks = upscale_logits(chunk, size)
        stability.append(calculate_stability_score(masks, config.mask_threshold, config.stability_score_offset))
        boxes.append(boxes_of_logits(masks, config.mask_threshold))
    return torch.cat(stability), torch.cat(boxes)
