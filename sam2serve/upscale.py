"""Low-resolution mask logits to full-resolution masks, with the arithmetic only at mask edges.

sam2 upscales each mask's logits bilinearly to the image (`F.interpolate`, align_corners=False)
and thresholds them: `upscale_logits(logits, size) > threshold`, the reference here. Every output
pixel is a weighted mean of the 2x2 low-resolution logits around it (weights >= 0, summing to
one), so where all four lie above the threshold, every pixel between them does too, and where
all four lie at or below it, none does: only the low-resolution cells that a mask's edge crosses
need a pixel's arithmetic. `masks_above` fills the other cells by copying whole rows and columns,
and computes the edge cells' pixels exactly as torch's CPU kernel does (the same weights, the
same fused multiply-adds; checked against it on first use, falling back to it where they differ).
A 64x64 mask upscaled to 1024x768 then costs a copy and a few thousand pixels' arithmetic
instead of 786 432. The answers equal the reference's (tests/test_upscale.py).
"""

from functools import cache

import torch
import torch.nn.functional as F


def upscale_logits(low_res_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) logits -> (N, H, W), bilinear as sam2's postprocess_masks: the reference."""
    return F.interpolate(low_res_logits[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0]


def source_positions(out_size: int, in_size: int, device: torch.device):
    """Along one axis, as torch's bilinear kernel: for each output pixel the two input pixels it
    reads (i0, i1) and their weights (w0, w1)."""
    scale = torch.tensor(float(in_size)) / torch.tensor(float(out_size))  # float32, as torch's kernel
    src = (scale * (torch.arange(out_size, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.long()
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    w1 = src - i0
    return i0.to(device), i1.to(device), (1 - w1).to(device), w1.to(device)


def _fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c rounded once to float32 (a float32 product is exact in float64)."""
    return (a.double() * b.double() + c.double()).float()


def _blend(p: torch.Tensor, q: torch.Tensor, wp: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """p * wp + q * wq in the order torch's CPU kernel computes it: fma(wp, p, q * wq)."""
    return _fma(wp, p, q * wq)


def interpolate_at(logits: torch.Tensor, n: torch.Tensor, y: torch.Tensor, x: torch.Tensor, size) -> torch.Tensor:
    """The reference's upscaled value at pixels (n, y, x), computed for those pixels only."""
    h, w = logits.shape[-2:]
    y0, y1, wy0, wy1 = (t[y] for t in source_positions(size[0], h, logits.device))
    x0, x1, wx0, wx1 = (t[x] for t in source_positions(size[1], w, logits.device))
    top = _blend(logits[n, y0, x0], logits[n, y0, x1], wx0, wx1)
    bottom = _blend(logits[n, y1, x0], logits[n, y1, x1], wx0, wx1)
    return _blend(top, bottom, wy0, wy1)


@cache
def _exact_on_this_machine() -> bool:
    """Whether interpolate_at reproduces torch's CPU kernel bit for bit here (it depends on how
    the kernel was compiled: fused multiply-adds or not)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 23, 37, generator=generator) * 10
    size = (101, 77)
    n, y, x = torch.meshgrid(*(torch.arange(s) for s in (2, *size)), indexing="ij")
    values = interpolate_at(logits, n.ravel(), y.ravel(), x.ravel(), size).reshape(2, *size)
    return torch.equal(values, upscale_logits(logits, size))


def masks_above(low_res_logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.0) -> torch.Tensor:
    """(N, h, w) logits -> (N, H, W) bool: upscale_logits(logits, size) > threshold, computing
    pixels only in the low-resolution cells that a mask's edge crosses."""
    logits = low_res_logits.float()
    if logits.device.type != "cpu" or not _exact_on_this_machine() or len(logits) == 0:
        return upscale_logits(logits, size) > threshold
    height, width = size
    n_masks, h, w = logits.shape
    # Cell (i, j): the output pixels that read input rows i, i1 and columns j, j1.
    below_right = F.pad(logits[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]
    corners = torch.stack([below_right[:, :h, :w], below_right[:, 1:, :w], below_right[:, :h, 1:],
                           below_right[:, 1:, 1:]])
    low, high = corners.amin(dim=0), corners.amax(dim=0)
    # A convex combination of values > 0 is > 0 and of values <= 0 is <= 0 in floating point too;
    # for other thresholds, rounding could cross it: cells within a few ulps count as crossed.
    margin = 0.0 if threshold == 0.0 else 1e-6 * torch.maximum(low.abs(), high.abs())
    inside, crossed = low > threshold + margin, (high > threshold - margin) & ~(low > threshold + margin)

    rows, cols = source_positions(height, h, logits.device)[0], source_positions(width, w, logits.device)[0]
    masks = inside.index_select(2, cols).index_select(1, rows)  # columns first: the smaller copy
    row_start, row_count = _runs(rows, h)
    col_start, col_count = _runs(cols, w)
    cells = crossed.nonzero()  # (K, 3): mask, row, column
    cells = cells[(row_count[cells[:, 1]] > 0) & (col_count[cells[:, 2]] > 0)]  # cells some pixel reads
    if len(cells) == 0:
        return masks
    # Each crossed cell's pixels: a run of output rows times a run of output columns, padded to
    # the longest runs by repeating the cell's last pixel (written twice, with the same value).
    n, i, j = cells.unbind(1)
    dy = torch.arange(int(row_count.max()), device=logits.device)
    dx = torch.arange(int(col_count.max()), device=logits.device)
    y = row_start[i, None] + torch.minimum(dy, row_count[i, None] - 1)  # (K, R)
    x = col_start[j, None] + torch.minimum(dx, col_count[j, None] - 1)  # (K, C)
    i1, j1 = (i + 1).clamp(max=h - 1), (j + 1).clamp(max=w - 1)
    _, _, wy0, wy1 = source_positions(height, h, logits.device)
    _, _, wx0, wx1 = source_positions(width, w, logits.device)
    top = _blend(logits[n, i, j][:, None], logits[n, i, j1][:, None], wx0[x], wx1[x])  # (K, C)
    bottom = _blend(logits[n, i1, j][:, None], logits[n, i1, j1][:, None], wx0[x], wx1[x])
    values = _blend(top[:, None, :], bottom[:, None, :], wy0[y][:, :, None], wy1[y][:, :, None])  # (K, R, C)
    masks[n[:, None, None], y[:, :, None], x[:, None, :]] = values > threshold
    return masks


def _runs(sources: torch.Tensor, in_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a non-decreasing map output pixel -> input pixel: each input pixel's first output
    pixel and how many read it first (in_size,)."""
    count = torch.bincount(sources, minlength=in_size)
    return torch.cumsum(count, 0) - count, count
