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
786 432. The answers equal the reference's (tests/test_upscale.py) for logits of 0 or of
magnitude 1e-30 to 1e30 (tested; a model's are far inside): near float's smallest numbers a
weight's product rounds apart, and the reference's 0 * inf is NaN. sam2 upscales a point's three
masks in one call, and on some CPUs (torch 2.15, AVX-512) torch's kernel takes another path for
three channels whose rounding differs by up to about 1e-5 of the logits' size: a pixel whose
logit lies that close to 0 can come out unlike sam2's (measured: one pixel in 6300 masks), as the
factored decoder's own rounding (model.py) can make it.
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
    pixel i is `first` for count[i] consecutive output pixels.

    Those pixels are cut into runs of at most run_length: the border cells hold up to half a
    cell more than the others, and padding every cell to the longest would compute up to twice
    the pixels at edges."""

    first: torch.Tensor  # (out,) long
    w0: torch.Tensor  # (out,) float32
    w1: torch.Tensor
    count: torch.Tensor  # (in,) long
    run_cell: torch.Tensor  # (runs,) long: the input pixel whose output pixels a run holds
    run_pixels: torch.Tensor  # (runs, run_length) long: its output pixels, the last repeated as padding
    run_w0: torch.Tensor  # (runs, run_length) w0 and w1 of those pixels
    run_w1: torch.Tensor
    run_w0_nan: torch.Tensor  # run_w0 with NaN on the padding


@lru_cache(maxsize=64)
def axis(out_size: int, in_size: int) -> Axis:
    scale = torch.tensor(float(in_size)) / torch.tensor(float(out_size))  # float32, as torch's kernel
    src = (scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    first = src.long()
    w1 = src - first
    count = torch.bincount(first, minlength=in_size)
    start = torch.cumsum(count, 0) - count
    run_length = -(-out_size // in_size)  # the interior cells' longest
    parts = -(-count // run_length)  # runs per cell (0 for a cell no output pixel reads)
    run_cell = torch.repeat_interleave(torch.arange(in_size), parts)
    part = torch.arange(len(run_cell)) - torch.repeat_interleave(torch.cumsum(parts, 0) - parts, parts)
    run_start = start[run_cell] + part * run_length
    run_count = torch.minimum(count[run_cell] - part * run_length, torch.tensor(run_length))
    offset = torch.arange(run_length)
    run_pixels = run_start[:, None] + torch.minimum(offset, run_count[:, None] - 1)
    w0 = 1 - w1
    run_w0 = w0[run_pixels]
    run_w0_nan = run_w0.masked_fill(offset >= run_count[:, None], float("nan"))
    return Axis(first, w0, w1, count, run_cell, run_pixels, run_w0, w1[run_pixels], run_w0_nan)


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
    combination of values > 0 is > 0, and of values <= 0 is <= 0, in floating point too (for
    values far from float's smallest, as the module's docstring says); for
    other thresholds rounding could cross it, so cells within a few ulps count as crossed."""
    margin = 0.0 if threshold == 0.0 else 1e-6 * torch.maximum(c.low.abs(), c.high.abs())
    inside = c.low > threshold + margin
    return inside, (c.high > threshold - margin) & ~inside


class EdgePixels(NamedTuple):
    """The pixels of some cells, in runs of rows and columns (Axis), each padded to the run length."""

    mask: torch.Tensor  # (K,) which mask
    y: torch.Tensor  # (K, R) output rows, a run's last row repeated as padding
    x: torch.Tensor  # (K, C)
    values: torch.Tensor  # (K, R, C) upscaled logits, as the reference computes them; padding below


def edge_pixels(logits: torch.Tensor, crossed: torch.Tensor, size: tuple[int, int],
                nan_padding: bool = False) -> EdgePixels:
    """The upscaled values of every pixel in the crossed cells (N, h, w) bool. Padding repeats a
    run's last row or column, or with nan_padding is NaN: above no threshold, so counts count
    each pixel once."""
    h, w = logits.shape[-2:]
    rows, cols = axis(size[0], h), axis(size[1], w)
    crossed_runs = crossed.index_select(1, rows.run_cell).index_select(2, cols.run_cell)
    n, a, b = crossed_runs.nonzero().unbind(1)
    i, j = rows.run_cell[a], cols.run_cell[b]
    y, x = rows.run_pixels[a], cols.run_pixels[b]  # (K, R), (K, C)
    # A NaN weight makes the pixel NaN.
    wy0, wx0 = (rows.run_w0_nan[a], cols.run_w0_nan[b]) if nan_padding else (rows.run_w0[a], cols.run_w0[b])
    wy1, wx1 = rows.run_w1[a], cols.run_w1[b]
    # The four corners, gathered from the flat logits: the next row and column, or the cell's
    # own at the border (as the kernel reads them).
    flat = logits.reshape(-1)
    top_left = (n * h + i) * w + j
    right, down = torch.where(j < w - 1, 1, 0), torch.where(i < h - 1, w, 0)
    corner = [flat[top_left + offset][:, None] for offset in (0, right, down, down + right)]
    top, bottom = _blend(corner[0], corner[1], wx0, wx1), _blend(corner[2], corner[3], wx0, wx1)  # (K, C)
    values = _blend(top[:, None, :], bottom[:, None, :], wy0[:, :, None], wy1[:, :, None])
    return EdgePixels(n, y, x, values)


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
    # Padding repeats a run's own last row or column: written twice with the same value.
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
    edge = edge_pixels(logits, crossed, size, nan_padding=True)
    values = edge.values
    cell_pixels = rows.count[:, None] * cols.count[None, :]  # (h, w)
    counts = []
    for level, (inside, _) in zip(levels[:2], classified[:2]):
        whole = torch.where(inside & ~crossed, cell_pixels, 0).sum(dim=(1, 2))
        at_edges = (values > level).flatten(1).sum(1, dtype=torch.int32)
        counts.append(whole.index_add(0, edge.mask, at_edges.long()))
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
