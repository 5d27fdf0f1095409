"""Comparing two sets of RLE results (what each image's /upload_rle returned), image by image.

Masks are matched one to one by IoU with an optimal assignment (not by rank), in both modes:
- strict (the study's): an image whose mask count differs from the reference's is a "mask count
  mismatch" and left out; an image's IoU is the mean over its matched masks.
- relaxed: every image counts; masks left without a partner (the counts differ) count as IoU 0,
  so an extra or missing sub-division costs a little instead of discarding the image.
mIoU is the mean over images. Two empty masks, or two images without masks, agree fully (1.0).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from .rle import RLE


@dataclass(frozen=True)
class ImageComparison:
    name: str
    reference_masks: int
    candidate_masks: int
    strict_iou: float | None  # None on a mask count mismatch
    relaxed_iou: float


@dataclass(frozen=True)
class Summary:
    images: int
    mask_count_mismatch: int
    miou: float | None  # strict; None when every image is a mismatch
    relaxed_miou: float | None  # None when there are no images

    def as_dict(self) -> dict:
        return {"miou": self.miou, "relaxed_miou": self.relaxed_miou,
                "mask_count_mismatch": self.mask_count_mismatch, "images": self.images}

    def line(self) -> str:
        strict = "n/a" if self.miou is None else f"{self.miou:.6f}"
        relaxed = "n/a" if self.relaxed_miou is None else f"{self.relaxed_miou:.6f}"
        return (f"images {self.images}, mask count mismatch {self.mask_count_mismatch}, "
                f"mIoU {strict} (strict, {self.images - self.mask_count_mismatch} images), "
                f"relaxed mIoU {relaxed}")


def iou_matrix(reference: list[RLE], candidate: list[RLE]) -> np.ndarray:
    """(len(reference), len(candidate)) mask IoUs; two empty masks have IoU 1."""
    if not reference or not candidate:
        return np.zeros((len(reference), len(candidate)))
    h, w = reference[0]["size"]
    if list(candidate[0]["size"]) != [h, w]:
        raise ValueError(f"mask sizes differ: {[h, w]} against {candidate[0]['size']}")
    ref, cand = mask_utils.frPyObjects(reference, h, w), mask_utils.frPyObjects(candidate, h, w)
    ious = np.asarray(mask_utils.iou(ref, cand, [0] * len(cand)), dtype=np.float64).reshape(len(ref), len(cand))
    both_empty = (mask_utils.area(ref)[:, None] == 0) & (mask_utils.area(cand)[None, :] == 0)
    ious[both_empty] = 1.0
    return ious


def compare_image(name: str, reference: list[RLE], candidate: list[RLE]) -> ImageComparison:
    ious = iou_matrix(reference, candidate)
    rows, cols = linear_sum_assignment(ious, maximize=True)
    matched = ious[rows, cols]
    n_ref, n_cand = len(reference), len(candidate)
    # Unmatched masks contribute 0 to the sum but count in the denominator.
    relaxed = 1.0 if n_ref == n_cand == 0 else float(matched.sum()) / max(n_ref, n_cand)
    strict = None
    if n_ref == n_cand:
        strict = 1.0 if n_ref == 0 else float(matched.mean())
    return ImageComparison(name, n_ref, n_cand, strict, relaxed)


def summarize(comparisons: list[ImageComparison]) -> Summary:
    strict = [c.strict_iou for c in comparisons if c.strict_iou is not None]
    return Summary(
        images=len(comparisons),
        mask_count_mismatch=len(comparisons) - len(strict),
        miou=float(np.mean(strict)) if strict else None,
        relaxed_miou=float(np.mean([c.relaxed_iou for c in comparisons])) if comparisons else None,
    )


def masks_of(result: object, where: str) -> list[RLE]:
    """The masks of one /upload_rle answer, in order mask_0, mask_1, ..., each checked to be an
    uncompressed RLE of its size (pycocotools runs forever on counts that do not add up)."""
    if (not isinstance(result, dict) or "error" in result
            or not all(key.startswith("mask_") and key[5:].isdigit() for key in result)):
        raise ValueError(f"{where} is not a mask result: {json.dumps(result)[:200]}")
    masks = [result[key] for key in sorted(result, key=lambda key: int(key[5:]))]
    for index, rle in enumerate(masks):
        check_rle(rle, f"{where}, mask_{index}")
        if rle["size"] != masks[0]["size"]:
            raise ValueError(f"{where}, mask_{index}: size {rle['size']}, mask_0's is {masks[0]['size']}")
    return masks


def check_rle(rle: object, where: str) -> None:
    """An uncompressed COCO RLE: {"size": [h, w], "counts": [...]} whose counts add up to h * w."""
    size = rle.get("size") if isinstance(rle, dict) else None
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(type(n) is int and n >= 0 for n in size)):
        raise ValueError(f"{where}: expected an RLE with a size [h, w] of whole numbers")
    if not (isinstance(counts, list) and all(type(n) is int and n >= 0 for n in counts)):
        raise ValueError(f"{where}: expected counts as a list of whole numbers (uncompressed RLE)")
    if sum(counts) != size[0] * size[1]:
        raise ValueError(f"{where}: counts add up to {sum(counts)}, not {size[0]} x {size[1]} = {size[0] * size[1]}")


def parse_line(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"{where} is not JSON: {error}") from None


def load_results(path: str | Path) -> list[tuple[str, list[RLE]]]:
    """(name, masks) per image, from a file of one JSON per line or a folder of JSON files.

    Lines are named by their number; files by their name, in sorted order.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        return [(file.name, masks_of(parse_line(read_text(file), str(file)), str(file))) for file in files]
    lines = read_text(path).splitlines()
    return [(f"line {i + 1}", masks_of(parse_line(line, f"line {i + 1} of {path}"), f"line {i + 1} of {path}"))
            for i, line in enumerate(lines) if line.strip()]


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file of results (one JSON per line, as /upload_rle answers)") from None


def compare_results(reference_path: str | Path, candidate_path: str | Path) -> list[ImageComparison]:
    """Compares two result sets image by image; they must hold the same images."""
    reference, candidate = load_results(reference_path), load_results(candidate_path)
    if len(reference) != len(candidate):
        raise ValueError(f"{reference_path} has {len(reference)} images, {candidate_path} has {len(candidate)}")
    if Path(reference_path).is_dir() and Path(candidate_path).is_dir():
        missing = {name for name, _ in reference} ^ {name for name, _ in candidate}
        if missing:
            raise ValueError(f"the folders hold different files: {sorted(missing)[:5]}")
    pairs = tqdm(zip(reference, candidate), total=len(reference), unit="image", desc="comparing",
                 disable=None)  # a progress bar on a terminal only
    return [compare_image(name, ref, cand) for (name, ref), (_, cand) in pairs]


def format_float(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6f}"
