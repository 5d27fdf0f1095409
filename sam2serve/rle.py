"""COCO uncompressed run-length encoding (RLE) of binary masks.

The format is pycocotools': pixels in column-major (Fortran) order, alternating run lengths that
start with a run of zeros (which is 0 when the mask's first pixel is set), and the mask's [h, w].

`masks_to_rle_reference` is the `sam2` package's encoder: one Python iteration and one device
sync per mask. `masks_to_rle_vectorized` encodes all masks with a handful of tensor operations
and moves the result to the host in one transfer; tests compare the two, and both with
pycocotools. `counts_from_string` reads COCO's compressed form (what `?format=coco` answers).
"""

import json
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from sam2.utils.amg import mask_to_rle_pytorch

RLE = dict[str, Any]  # {"size": [h, w], "counts": [int, ...]}
RunLengths = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # what rle_run_lengths returns


def masks_to_rle_reference(masks: torch.Tensor) -> list[RLE]:
    """The `sam2` package's encoder, for comparison. masks: (N, H, W) bool."""
    return mask_to_rle_pytorch(masks)


def masks_to_rle_vectorized(masks: torch.Tensor) -> list[RLE]:
    """Encodes (N, H, W) bool masks at once, on their device, with one copy to the host."""
    n, h, w = masks.shape
    return run_lengths_to_rles([rle_run_lengths(masks)], h, w)


def run_lengths_to_rles(chunks: list[RunLengths], h: int, w: int) -> list[RLE]:
    """Moves the run lengths of one or more chunks of masks to the host in a single transfer
    and splits them into one COCO RLE per mask, in order."""
    if not chunks:
        return []
    run_lengths = torch.cat([chunk[0] for chunk in chunks])
    runs_per_mask = torch.cat([chunk[1] for chunk in chunks])
    starts_with_one = torch.cat([chunk[2] for chunk in chunks]).long()
    n = len(runs_per_mask)
    if n == 0:
        return []
    packed = torch.cat([runs_per_mask, starts_with_one, run_lengths]).cpu().numpy()
    runs_per_mask, starts_with_one, run_lengths = packed[:n], packed[n : 2 * n], packed[2 * n :]
    per_mask = np.split(run_lengths, np.cumsum(runs_per_mask)[:-1])
    return [
        {"size": [h, w], "counts": ([0] if first else []) + runs.tolist()}
        for runs, first in zip(per_mask, starts_with_one)
    ]


def rle_run_lengths(masks: torch.Tensor) -> RunLengths:
    """Run lengths of all masks, concatenated, stay on the masks' device.

    Returns:
      run_lengths (R,): every mask's runs in column-major order, mask after mask.
      runs_per_mask (N,): how many of run_lengths belong to each mask.
      starts_with_one (N,): whether the first pixel is set (COCO then starts with a 0 run).
    """
    n, h, w = masks.shape
    flat = masks.transpose(1, 2).reshape(n, h * w)  # (N, H*W), column-major per mask
    # A run border sits before every pixel that differs from its predecessor, and at both ends.
    borders = torch.ones((n, h * w + 1), dtype=torch.bool, device=masks.device)
    borders[:, 1:-1] = flat[:, 1:] != flat[:, :-1]
    mask_index, position = borders.nonzero(as_tuple=True)  # sorted by mask, then position
    # Differences of consecutive borders are run lengths, except across two masks.
    same_mask = mask_index[1:] == mask_index[:-1]
    run_lengths = (position[1:] - position[:-1])[same_mask]
    runs_per_mask = torch.bincount(mask_index, minlength=n) - 1
    if h * w == 0:  # no pixels: one empty background run, as pycocotools writes it
        return run_lengths, runs_per_mask, torch.ones(n, dtype=torch.bool, device=masks.device)
    # A copy: a view would keep the (N, H*W) copy of the masks alive with it (render_rles holds
    # every chunk's answer until the last: 7 GB on a 3 MP image with the filters off).
    return run_lengths, runs_per_mask, flat[:, 0].clone()


def rles_to_json(rles: list[RLE]) -> dict[str, RLE]:
    """The /upload_rle answer: {"mask_0": rle, "mask_1": rle, ...}, in the given order."""
    return {f"mask_{i}": rle for i, rle in enumerate(rles)}


def answer_text(rles: list[RLE]) -> str:
    """The /upload_rle body: compact JSON, key order kept, no newline, so that
    `curl -w "\\n"` over many images writes one document per line."""
    return json.dumps(rles_to_json(rles), separators=(",", ":"))


def rle_to_mask(rle: RLE) -> np.ndarray:
    """Decodes one uncompressed RLE to an (H, W) bool array with pycocotools."""
    h, w = rle["size"]
    return mask_utils.decode(mask_utils.frPyObjects(rle, h, w)).astype(bool)


def rles_to_masks(rles: list[RLE]) -> np.ndarray:
    """Decodes uncompressed RLEs of one image to an (N, H, W) bool array."""
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    h, w = rles[0]["size"]
    decoded = mask_utils.decode(mask_utils.frPyObjects(rles, h, w))  # (H, W, N)
    return np.moveaxis(decoded, -1, 0).astype(bool)


def counts_from_string(text: str) -> list[int]:
    """The run lengths in a COCO compressed RLE string (pycocotools' `encode`, sam2's
    `coco_encode_rle`), read here so that they can be checked before pycocotools sees them: its IoU
    runs forever on counts that do not add up to the mask's size, and a negative run is read as
    four billion pixels.

    Each run is a number in groups of 5 bits, lowest first, one character (48 + group) each:
    bit 0x20 says another group follows, bit 0x10 of the last group makes the number negative.
    From the fourth run on, the number is the difference to the run two before.
    """
    counts: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            if position == len(text):
                raise ValueError("the counts string ends inside a number")
            if shift > 64:  # no mask has 2**64 pixels; an endless number would cost quadratic time
                raise ValueError(f"the number at {position - shift // 5} of the counts string is longer than any run")
            group = ord(text[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"character {text[position]!r} at {position} is not of a COCO counts string")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position, shift = position + 1, shift + 5
            if not more and group & 0x10:
                value -= 1 << shift
        counts.append(value + (counts[-2] if len(counts) > 2 else 0))
    return counts


def rle_area(rle: RLE) -> int:
    """Number of set pixels: the sum of the odd-indexed runs."""
    return int(sum(rle["counts"][1::2]))
