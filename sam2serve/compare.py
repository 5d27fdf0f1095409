"""Comparing two sets of RLE results (what each image's /upload_rle returned, as masks or as
`?format=coco` annotations), image by image.

Masks are matched one to one by IoU with an optimal assignment (not by rank), in both modes:
- strict (the study's): an image whose mask count differs from the reference's is a "mask count
  mismatch" and left out; an image's IoU is the mean over its matched masks.
- relaxed: every image counts; masks left without a partner (the counts differ) count as IoU 0,
  so an extra or missing sub-division costs a little instead of discarding the image.
mIoU is the mean over images. Two empty masks, or two images without masks, agree fully (1.0).
A request that failed on either side (an error answer, or the empty line that curl writes when it
cannot connect) leaves its image out of both, counted and named, as it says nothing of accuracy.
"""

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from scipy.optimize import linear_sum_assignment
from tqdm import tqdm

from .rle import RLE, counts_from_string


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


@dataclass(frozen=True)
class ImageComparison:
    name: str
    reference_masks: int | None  # None: the request failed on this side
    candidate_masks: int | None
    strict_iou: float | None  # None on a mask count mismatch or a failed request
    relaxed_iou: float | None  # None on a failed request

    @property
    def failed(self) -> str:
        """Which side's request failed: "", "reference", "candidate" or "both"."""
        sides = [side for side, masks in (("reference", self.reference_masks), ("candidate", self.candidate_masks))
                 if masks is None]
        return "both" if len(sides) == 2 else "".join(sides)


@dataclass(frozen=True)
class Summary:
    images: int  # compared: their requests succeeded on both sides
    mask_count_mismatch: int
    miou: float | None  # strict; None when every image is a mismatch
    relaxed_miou: float | None  # None when there are no images
    masks_per_image: float | None  # the candidate's, over the images compared
    reference_masks_per_image: float | None
    failed: tuple[str, ...] = ()  # names of the images left out: a request failed

    def as_dict(self) -> dict:
        return {"miou": self.miou, "relaxed_miou": self.relaxed_miou,
                "mask_count_mismatch": self.mask_count_mismatch, "images": self.images,
                "masks_per_image": self.masks_per_image, "reference_masks_per_image": self.reference_masks_per_image,
                "failed": len(self.failed)}

    def line(self) -> str:
        strict = "n/a" if self.miou is None else f"{self.miou:.6f}"
        relaxed = "n/a" if self.relaxed_miou is None else f"{self.relaxed_miou:.6f}"
        masks = "n/a" if self.masks_per_image is None else (
            f"{self.masks_per_image:.1f} (reference {self.reference_masks_per_image:.1f})")
        failed = (f", left out {len(self.failed)} whose request failed ({', '.join(self.failed[:5])}"
                  f"{', ...' if len(self.failed) > 5 else ''})" if self.failed else "")
        return (f"images {self.images}{failed}, mask count mismatch {self.mask_count_mismatch}, "
                f"mIoU {strict} (strict, {plural(self.images - self.mask_count_mismatch, 'image')}), "
                f"relaxed mIoU {relaxed}, masks per image {masks}")


def iou_matrix(reference: list[RLE], candidate: list[RLE]) -> np.ndarray:
    """(len(reference), len(candidate)) mask IoUs; two empty masks have IoU 1."""
    if not reference or not candidate:
        return np.zeros((len(reference), len(candidate)))
    h, w = reference[0]["size"]
    if list(candidate[0]["size"]) != [h, w]:
        raise ValueError(f"mask sizes differ: {[h, w]} against {candidate[0]['size']}")
    ref, cand = (mask_utils.frPyObjects([without_empty_runs(rle) for rle in side], h, w)
                 for side in (reference, candidate))
    ious = np.asarray(mask_utils.iou(ref, cand, [0] * len(cand)), dtype=np.float64).reshape(len(ref), len(cand))
    both_empty = (areas(reference)[:, None] == 0) & (areas(candidate)[None, :] == 0)
    ious[both_empty] = 1.0
    return ious


def compare_image(name: str, reference: list[RLE] | None, candidate: list[RLE] | None) -> ImageComparison:
    """One image's IoUs; None for a side whose request failed."""
    if reference is None or candidate is None:
        return ImageComparison(name, None if reference is None else len(reference),
                               None if candidate is None else len(candidate), None, None)
    try:
        ious = iou_matrix(reference, candidate)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
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
    compared = [c for c in comparisons if not c.failed]
    strict = [c.strict_iou for c in compared if c.strict_iou is not None]

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    return Summary(
        images=len(compared),
        mask_count_mismatch=len(compared) - len(strict),
        miou=mean(strict),
        relaxed_miou=mean([c.relaxed_iou for c in compared]),
        masks_per_image=mean([c.candidate_masks for c in compared]),
        reference_masks_per_image=mean([c.reference_masks for c in compared]),
        failed=tuple(f"{c.name}: {c.failed}" for c in comparisons if c.failed),
    )


def masks_of(result: object, where: str) -> list[RLE] | None:
    """The masks of one answer, each checked to be an RLE of its size (pycocotools runs forever on
    counts that do not add up); None for an error answer ({"error": ...}): the request failed.

    An answer is /upload_rle's {"mask_0": rle, "mask_1": rle, ...} (masks in that order), or
    `?format=coco`'s list of annotations (masks in the list's order) whose `segmentation` is a
    compressed RLE, read into uncompressed counts here."""
    if isinstance(result, dict) and set(result) == {"error"}:
        return None
    if isinstance(result, list):
        masks = [segmentation_of(annotation, f"{where}, annotation {index}")
                 for index, annotation in enumerate(result)]
        names = [f"annotation {index}" for index in range(len(masks))]
    elif isinstance(result, dict) and all(key.startswith("mask_") and key[5:].isascii() and key[5:].isdigit()
                                          for key in result):
        names = sorted(result, key=lambda key: int(key[5:]))
        masks = [result[key] for key in names]
    else:
        raise ValueError(f"{where} is not a mask result: {json.dumps(result)[:200]}")
    for name, rle in zip(names, masks):
        check_rle(rle, f"{where}, {name}")
        if rle["size"] != masks[0]["size"]:
            raise ValueError(f"{where}, {name}: size {rle['size']}, {names[0]}'s is {masks[0]['size']}")
    return masks


def segmentation_of(annotation: object, where: str) -> RLE:
    """A COCO annotation's mask as an uncompressed RLE (its counts string decoded)."""
    segmentation = annotation.get("segmentation") if isinstance(annotation, dict) else None
    if not isinstance(segmentation, dict):
        raise ValueError(f"{where}: expected a COCO annotation with an RLE segmentation")
    counts = segmentation.get("counts")
    if isinstance(counts, str):
        try:
            counts = counts_from_string(counts)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    return {"size": segmentation.get("size"), "counts": counts}


def check_rle(rle: object, where: str) -> None:
    """An uncompressed COCO RLE: {"size": [h, w], "counts": [...]} whose counts add up to h * w."""
    size = rle.get("size") if isinstance(rle, dict) else None
    counts = rle.get("counts") if isinstance(rle, dict) else None
    if not (isinstance(size, list) and len(size) == 2 and all(type(n) is int and n >= 0 for n in size)):
        raise ValueError(f"{where}: expected an RLE with a size [h, w] of whole numbers")
    if not isinstance(counts, list):
        raise ValueError(f"{where}: expected counts as a list of whole numbers (uncompressed RLE)")
    wrong = next((n for n in counts if not (type(n) is int and n >= 0)), None)
    if wrong is not None:
        raise ValueError(f"{where}: counts are runs of pixels, whole numbers from 0 up, not {json.dumps(wrong)}")
    if size[0] * size[1] >= 2**32:
        raise ValueError(f"{where}: a {size[0]} x {size[1]} mask has more pixels than pycocotools counts (2**32)")
    if sum(counts) != size[0] * size[1]:
        raise ValueError(f"{where}: counts add up to {sum(counts)}, not {size[0]} x {size[1]} = {size[0] * size[1]}")


def areas(rles: list[RLE]) -> np.ndarray:
    """Each mask's pixels: the sum of its odd runs. (pycocotools' own `area` failed on 256 masks or
    more at once: "OverflowError: Python integer 256 out of bounds for uint8", pycocotools 2.0.11.)"""
    return np.array([sum(rle["counts"][1::2]) for rle in rles], dtype=np.int64)


def without_empty_runs(rle: RLE) -> RLE:
    """The same mask with no run of 0 pixels but a first one (a mask that starts with its
    pixels): each other one joins the runs on either side of it. pycocotools decodes such counts
    right, but its IoU stops where both masks have one at once (a mask against itself: 0)."""
    counts = rle["counts"]
    if 0 not in counts[1:]:  # the project's encoder and pycocotools' write none
        return rle
    merged, join = counts[:1], False
    for run in counts[1:]:
        if join:
            merged[-1] += run
        elif run:
            merged.append(run)
        join = not run and not join
    return {"size": rle["size"], "counts": merged}


def parse_line(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"{where} is not JSON: {error}") from None


def load_results(path: str | Path) -> list[tuple[str, list[RLE] | None]]:
    """(name, masks) per image, from a file of one JSON per line, a folder of JSON files, or a
    study row's folder (its rle_masks); masks None where the request failed.

    Lines are named by their number (and a study row's by their image too); an empty line is a
    failed request (curl -w "\n" writes one when it cannot connect), so that every line stays
    paired with its image. Files are named by their name, in sorted order; an empty file is a
    failed request too (curl ... > name.json leaves one).
    """
    path = Path(path)
    images = study_row_images(path) if is_study_row(path) else []
    path = results_path(path)
    if path.is_char_device() or path.is_block_device():  # /dev/zero was read until memory ran out
        raise ValueError(f"{path} is a device, not a file of results")
    if path.is_dir():
        results = []
        if not (files := sorted(path.glob("*.json"))):
            if rows := sorted(folder.name for folder in path.iterdir() if is_study_row(folder)):
                example = next((row for row in rows if row.startswith("baseline")), rows[0])
                raise ValueError(f"{path} holds the study's rows ({', '.join(rows[:4])}"
                                 f"{f' and {len(rows) - 4} more' if len(rows) > 4 else ''}), not one set of results; "
                                 f"give one of them, e.g. {path / example}")
            raise ValueError(f"{path} is a folder without .json files; give a file of one JSON per line, a folder "
                             "of one .json file per image, or a study row's folder")
        for file in files:  # a whole file is one answer: it may be spread over lines (pretty-printed)
            text = read_text(file)
            results.append((file.name, masks_of(parse_line(text, str(file)), str(file)) if text.strip() else None))
        return results
    text = read_text(path)
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")  # a pretty-printed file may start blank
    if len(lines) > 1 and first and (document := one_document(first, text)) is not None:
        raise ValueError(spread_over_lines(path, len(lines), document))
    names = [f"line {i + 1}" + (f" ({images[i]})" if len(images) == len(lines) else "") for i in range(len(lines))]
    return [(name, masks_of(parse_line(line, f"line {i + 1} of {path}"), f"line {i + 1} of {path}")
             if line.strip() else None)
            for i, (name, line) in enumerate(zip(names, lines))]


def one_document(first_line: str, text: str) -> object | None:
    """The file's text as one JSON document when its first line is no JSON of its own (None
    otherwise): a pretty-printed file, `python -m json.tool`'s or a study row's stats.json."""
    try:
        json.loads(first_line)
    except ValueError:
        try:
            return json.loads(text)
        except ValueError:
            return None
    return None


def spread_over_lines(path: Path, lines: int, document: object) -> str:
    """Why a file of one JSON document over several lines is no result list, and what to give instead."""
    message = f"{path} is one JSON document spread over {lines} lines, where one answer per line is expected"
    if path.name == "stats.json" and is_study_row(path.parent):
        return f"{message}: it is a study row's stats.json; give the row's folder, {path.parent}"
    try:
        masks_of(document, str(path))
    except ValueError:
        return message
    quoted = shlex.quote(str(path))
    return (f"{message}; put this one answer on one line: jq -c . {quoted} > one_line.json "
            f"(or python -m json.tool --compact {quoted} > one_line.json)")


def results_path(path: Path) -> Path:
    """The file or folder that holds a set's results: a study row's rle_masks, or the path itself."""
    return path / "rle_masks" if is_study_row(path) else path


def same_results(reference_path: str | Path, candidate_path: str | Path) -> bool:
    """Whether two paths name one set of results, however spelt: ./, a symlink, a hard link, or a
    study row's folder and its rle_masks (False where either does not exist: loading says so)."""
    try:
        return results_path(Path(reference_path)).samefile(results_path(Path(candidate_path)))
    except OSError:
        return False


def is_study_row(path: Path) -> bool:
    return path.is_dir() and (path / "rle_masks").is_file()


def study_row_images(folder: Path) -> list[str]:
    """The image paths a study row's lines answer, from its stats.json (none if it has none)."""
    try:
        images = json.loads((folder / "stats.json").read_text())["settings"]["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [str(image) for image in images] if isinstance(images, list) else []


def settings_changed(before: dict, now: dict) -> list[str]:
    """The study settings that differ, named as the options are: "points_per_side 8 -> 4"."""
    flat_before, flat_now = ({**s, **s.get("amg", {})} for s in (before, now))
    changed = []
    for key in sorted(set(flat_before) | set(flat_now)):
        if key != "amg" and flat_before.get(key) != flat_now.get(key):
            changed.append({"images": "the image list", "image_contents": "the images' contents",
                            "code": "the project's code"}.get(
                key, f"{key} {flat_before.get(key)} -> {flat_now.get(key)}"))
    return changed


# What makes two study rows' masks answers to different questions: compared, their lines pair
# other images, or another model's. (The images' paths may differ: rows made on two machines.)
STUDY_INPUTS = ("image_contents", "checkpoint", "model_type")


def study_runs_differ(reference_path: str | Path, candidate_path: str | Path) -> tuple[list[str], list[str]]:
    """For two study rows (their folders, or their rle_masks files): (what differs in their
    inputs, what differs in their other settings) between the runs that made them; empty where
    they come from one run, or either is not a study row. A rerun with other settings leaves the
    rows it did not run on disk, made with the earlier ones."""
    settings = []
    for path in (Path(reference_path), Path(candidate_path)):
        folder = path if is_study_row(path) else path.parent if path.name == "rle_masks" else None
        try:
            settings.append(dict(json.loads((folder / "stats.json").read_text())["settings"]))
        except (TypeError, OSError, ValueError, KeyError):
            return [], []
    # The row (its mode, batch) and its points per batch differ from row to row of one run.
    before, now = ({key: value for key, value in s.items() if key not in ("row", "images")} for s in settings)
    for side in (before, now):
        side["amg"] = {key: value for key, value in side.get("amg", {}).items() if key != "points_per_batch"}
    inputs = settings_changed({k: before.get(k) for k in STUDY_INPUTS}, {k: now.get(k) for k in STUDY_INPUTS})
    others = settings_changed({k: v for k, v in before.items() if k not in STUDY_INPUTS},
                              {k: v for k, v in now.items() if k not in STUDY_INPUTS})
    return inputs, others


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file of results (one JSON per line, as /upload_rle answers)") from None


def compare_results(reference_path: str | Path, candidate_path: str | Path) -> list[ImageComparison]:
    """Compares two result sets image by image; they must hold the same images."""
    reference, candidate = load_results(reference_path), load_results(candidate_path)
    per_image_files = [Path(path).is_dir() and not is_study_row(Path(path)) for path in (reference_path, candidate_path)]
    if any(per_image_files) and not all(per_image_files):  # file names on one side, line numbers on the other
        raise ValueError("a folder of per-image .json files pairs only with another such folder (by file name), "
                         "not with a list of lines or a study row's folder")
    if all(per_image_files):
        missing = {name for name, _ in reference} ^ {name for name, _ in candidate}
        if missing:
            raise ValueError(f"the folders hold different files: {sorted(missing)[:5]}")
    if len(reference) != len(candidate):
        raise ValueError(f"{reference_path} has {len(reference)} images, {candidate_path} has {len(candidate)} "
                         "(an empty line counts as an image whose request failed)")
    if not reference:
        raise ValueError(f"{reference_path} and {candidate_path} hold no results")
    pairs = tqdm(zip(reference, candidate), total=len(reference), unit="image", desc="comparing",
                 disable=None)  # a progress bar on a terminal only
    comparisons = []
    for (name, ref), (_, cand) in pairs:
        # Each answer's masks share one size (masks_of checks): other sizes on the two sides are other images.
        if ref and cand and ref[0]["size"] != cand[0]["size"]:
            (ref_h, ref_w), (cand_h, cand_w) = ref[0]["size"], cand[0]["size"]
            order = "" if all(per_image_files) else " (or of the same ones in another order)"  # paired by line
            turned = ("; or of one image turned, its EXIF orientation applied on one side only"
                      if [ref_h, ref_w] == [cand_w, cand_h] else "")
            raise ValueError(f"{name}: the masks are {ref_h} x {ref_w} in {reference_path}, {cand_h} x {cand_w} in "
                             f"{candidate_path}: these seem to be results of different images{order}{turned}")
        comparisons.append(compare_image(name, ref, cand))
    return comparisons


def format_float(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.6f}"
