"""Low-resolution mask logits to full-resolution masks and scores, with the arithmetic only at
mask edges.

sam2 upscales each mask's logits bilinearly to the image (`F.interpolate`, align_corners=False)
and reads the result against thresholds: the mask (logits > 0), its box, and its stability score
(pixels above +1 over pixels above -1). `upscale_logits` is that upscale, the reference here.
Every output pixel is a weighted mean of the 2x2 low-resolution logits around it (weights >= 0,
summing to one), so where all four lie above a threshold every pixel between them does too, and
where all four lie at or below it none does. Only the low-resolution cells that an edge crosses
need a pixel's arithmetic; the others are copied (masks) or counted whole (scores). Edge pixels
are computed exactly as torch's CPU kernel computes them (the same weights, the same fused
multiply-adds), which is checked against the kernel on first use; where they differ, and on
other devices, the reference runs instead. For the micro model's 64x64 logits on a 1024x768
image, a cell is 16x12 pixels: a mask costs a copy and its edge's few thousand pixels instead of
786 432. The answers equal the reference's (tests/test_upscale.py).
"""

from functools import cache, lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Pixels per low-resolution cell below which the reference is faster (the official models'
# 256x256 logits on images under 1024 pixels).
MIN_CELL_PIXELS = 16


def upscale_logits(low_res_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) logits -> (N, H, W), bilinear as sam2's postprocess_masks: the reference."""
    return F.interpolate(low_res_logits[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0]


class Axis(NamedTuple):
    """One axis of the upscale, as torch's bilinear kernel: each output pixel reads input pixels
    `first` and first + 1 (the last pixel repeats at the border) with weights w0 and w1; input
    pixel i is `first` for output pixels start[i] .. start[i] + count[i] - 1."""

    first: torch.Tensor  # (out,) long
    w0: torch.Tensor  # (out,) float32
    w1: torch.Tensor
    start: torch.Tensor  # (in,) long
    count: torch.Tensor


@lru_cache(maxsize=64)
def axis(out_size: int, in_size: int) -> Axis:
    scale = torch.tensor(float(in_size)) / torch.tensor(float(out_size))  # float32, as torch's kernel
    src = (scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    first = src.long()
    w1 = src - first
    count = torch.bincount(first, minlength=in_size)
    return Axis(first, 1 - w1, w1, torch.cumsum(count, 0) - count, count)


def _blend(p: torch.Tensor, q: torch.Tensor, wp: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """p * wp + q * wq as torch's CPU kernel computes it: q * wq rounded, then a fused
    multiply-add (addcmul's, on CPUs that have one; _exact_on_this_machine checks)."""
    return torch.addcmul(q * wq, wp, p)


@cache
def _exact_on_this_machine() -> bool:
    """Whether edge_pixels reproduces torch's CPU kernel bit for bit here (it depends on how the
    kernel was compiled: fused multiply-adds or not), on every pixel of a random upscale."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 23, 37, generator=generator) * 10
    size = (101, 77)
    edge = edge_pixels(logits, torch.ones(logits.shape, dtype=torch.bool), size)
    expected = upscale_logits(logits, size)[edge.mask[:, None, None], edge.y[:, :, None], edge.x[:, None, :]]
    return torch.equal(edge.values, expected)


def use_cells(logits: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether the cell-by-cell path runs: on a CPU whose kernel it reproduces, upscaling, with
    cells large enough to be worth it."""
    h, w = logits.shape[-2:]
    return (logits.device.type == "cpu" and len(logits) > 0 and size[0] >= h and size[1] >= w
            and size[0] * size[1] >= MIN_CELL_PIXELS * h * w and _exact_on_this_machine())


class Cells(NamedTuple):
    """Low-resolution cells against thresholds: cell (i, j) holds the output pixels that read
    input rows i, i + 1 and columns j, j + 1."""

    low: torch.Tensor  # (N, h, w) the smallest of a cell's four logits
    high: torch.Tensor  # (N, h, w) the largest


def cells(logits: torch.Tensor) -> Cells:
    """(N, h, w) logits -> each cell's smallest and largest corner (the last row and column
    read themselves as their neighbour, as the upscale does at the border)."""
    padded = F.pad(logits[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]
    h, w = logits.shape[-2:]
    corners = torch.stack([padded[:, :h, :w], padded[:, 1:, :w], padded[:, :h, 1:], padded[:, 1:, 1:]])
    return Cells(corners.amin(dim=0), corners.amax(dim=0))


def classify(c: Cells, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cells whose every pixel is above the threshold, cells an edge may cross). A convex
    combination of values > 0 is > 0, and of values <= 0 is <= 0, in floating point too; for
    other thresholds rounding could cross it, so cells within a few ulps count as crossed."""
    margin = 0.0 if threshold == 0.0 else 1e-6 * torch.maximum(c.low.abs(), c.high.abs())
    inside = c.low > threshold + margin
    return inside, (c.high > threshold - margin) & ~inside


class EdgePixels(NamedTuple):
    """The pixels of some cells, each cell's padded to the longest runs of rows and columns."""

    mask: torch.Tensor  # (K,) which mask
    y: torch.Tensor  # (K, R) output rows, a cell's last row repeated as padding
    x: torch.Tensor  # (K, C)
    valid: torch.Tensor  # (K, R, C) False on padding
    values: torch.Tensor  # (K, R, C) upscaled logits, as the reference computes them


def edge_pixels(logits: torch.Tensor, crossed: torch.Tensor, size: tuple[int, int]) -> EdgePixels:
    """The upscaled values of every pixel in the crossed cells (N, h, w) bool."""
    h, w = logits.shape[-2:]
    rows, cols = axis(size[0], h), axis(size[1], w)
    n, i, j = crossed.nonzero().unbind(1)
    keep = (rows.count[i] > 0) & (cols.count[j] > 0)  # cells that some output pixel reads
    n, i, j = n[keep], i[keep], j[keep]
    dy, dx = torch.arange(int(rows.count.max())), torch.arange(int(cols.count.max()))
    y = rows.start[i, None] + torch.minimum(dy, rows.count[i, None] - 1)  # (K, R)
    x = cols.start[j, None] + torch.minimum(dx, cols.count[j, None] - 1)  # (K, C)
    valid = (dy < rows.count[i, None])[:, :, None] & (dx < cols.count[j, None])[:, None, :]
    i1, j1 = (i + 1).clamp(max=h - 1), (j + 1).clamp(max=w - 1)
    top = _blend(logits[n, i, j][:, None], logits[n, i, j1][:, None], cols.w0[x], cols.w1[x])  # (K, C)
    bottom = _blend(logits[n, i1, j][:, None], logits[n, i1, j1][:, None], cols.w0[x], cols.w1[x])
    values = _blend(top[:, None, :], bottom[:, None, :], rows.w0[y][:, :, None], rows.w1[y][:, :, None])
    return EdgePixels(n, y, x, valid, values)


def counted_values(edge: EdgePixels) -> torch.Tensor:
    """The edge's values with padding at -inf: above no threshold, counted once."""
    return edge.values.masked_fill(~edge.valid, float("-inf"))


def masks_above(low_res_logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.0) -> torch.Tensor:
    """(..., h, w) logits -> (..., H, W) bool: upscale_logits(logits, size) > threshold,
    computing pixels only in the cells that a mask's edge crosses."""
    *lead, h, w = low_res_logits.shape
    logits = low_res_logits.float().reshape(-1, h, w)
    if not use_cells(logits, size):
        return (upscale_logits(logits, size) > threshold).reshape(*lead, *size)
    inside, crossed = classify(cells(logits), threshold)
    rows, cols = axis(size[0], h), axis(size[1], w)
    masks = inside.index_select(2, cols.first).index_select(1, rows.first)  # columns first: the smaller copy
    edge = edge_pixels(logits, crossed, size)
    # Padding repeats a cell's own last row or column: written twice with the same value.
    flat_index = (edge.mask[:, None, None] * size[0] + edge.y[:, :, None]) * size[1] + edge.x[:, None, :]
    masks.view(-1).scatter_(0, flat_index.view(-1), (edge.values > threshold).view(-1))
    return masks.reshape(*lead, *size)


def stability_and_boxes(
    low_res_logits: torch.Tensor, size: tuple[int, int], threshold: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """sam2's stability score of each mask upscaled to `size` (pixels above threshold + offset
    over pixels above threshold - offset) and the XYXY box of its pixels above threshold
    ([0, 0, 0, 0] when empty), counting whole cells and computing only the crossed ones' pixels:
    (N,) float32, (N, 4) long. The caller checks use_cells."""
    logits = low_res_logits.float()
    h, w = logits.shape[-2:]
    rows, cols = axis(size[0], h), axis(size[1], w)
    c = cells(logits)
    levels = (threshold + offset, threshold - offset, threshold)
    classified = [classify(c, level) for level in levels]
    crossed = classified[0][1] | classified[1][1] | classified[2][1]  # computed for every level
    edge = edge_pixels(logits, crossed, size)
    values = counted_values(edge)
    cell_pixels = rows.count[:, None] * cols.count[None, :]  # (h, w)
    counts = []
    for level, (inside, _) in zip(levels[:2], classified[:2]):
        whole = torch.where(inside & ~crossed, cell_pixels, 0).sum(dim=(1, 2))
        counts.append(whole.index_add(0, edge.mask, (values > level).sum(dim=(1, 2))))
    stability = counts[0].int() / counts[1].int()

    # Boxes: the rows and columns holding a pixel above the threshold.
    inside = classified[2][0] & ~crossed
    present_rows = inside.any(dim=2).index_select(1, rows.first)  # (N, H)
    present_cols = inside.any(dim=1).index_select(1, cols.first)  # (N, W)
    hit = values > threshold  # (K, R, C)
    k, r = hit.any(dim=2).nonzero().unbind(1)
    present_rows[edge.mask[k], edge.y[k, r]] = True
    k, q = hit.any(dim=1).nonzero().unbind(1)
    present_cols[edge.mask[k], edge.x[k, q]] = True
    return stability, boxes_of_presence(present_rows, present_cols)


def boxes_of_presence(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(N, H) rows and (N, W) columns holding a mask's pixels -> XYXY boxes (N, 4), [0, 0, 0, 0]
    for an empty mask, as sam2's batched_mask_to_box."""

    def first_and_last(present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(present.shape[-1], device=present.device)
        return torch.where(present, index, present.shape[-1]).amin(dim=-1), (present * index).amax(dim=-1)

    (top, bottom), (left, right) = first_and_last(rows), first_and_last(cols)
    boxes = torch.stack([left, top, right, bottom], dim=-1)
    return boxes * rows.any(dim=-1, keepdim=True)
