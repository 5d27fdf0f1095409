"""masks_above (pixels computed only where a mask's edge crosses a low-resolution cell) against
its reference, the bilinear upscale sam2 uses followed by the threshold."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sam2.utils.amg import batched_mask_to_box, calculate_stability_score

from sam2serve import upscale
from sam2serve.upscale import masks_above, stability_and_boxes, upscale_logits

REPO = Path(__file__).resolve().parents[1]
SIZES = [  # (h, w) -> (H, W): the micro and official low-resolution sizes, up, down, odd ratios
    ((64, 64), (768, 1024)), ((64, 64), (375, 500)), ((64, 64), (300, 451)), ((256, 256), (427, 640)),
    ((256, 256), (1000, 777)), ((64, 64), (64, 64)), ((64, 64), (100, 30)), ((64, 64), (1, 1)),
]


def smooth_logits(generator: torch.Generator, h: int, w: int, noise: float) -> torch.Tensor:
    """Three masks' worth of logits: large blobs (long edges) plus pixel noise (many crossings)."""
    blobs = F.interpolate(torch.randn(3, 1, 8, 8, generator=generator) * 8, (h, w), mode="bicubic")[:, 0]
    return blobs + noise * torch.randn(3, h, w, generator=generator)


@pytest.mark.parametrize("low, size", SIZES)
@pytest.mark.parametrize("threshold", [0.0, 1.0, -1.0])
def test_masks_above_equal_the_thresholded_bilinear_upscale(low, size, threshold):
    generator = torch.Generator().manual_seed(sum(low) + sum(size))
    for noise in (0.0, 0.5, 5.0):
        logits = smooth_logits(generator, *low, noise)
        expected = upscale_logits(logits, size) > threshold
        assert torch.equal(masks_above(logits, size, threshold), expected)


@pytest.mark.parametrize("out_size, in_size", [(1024, 64), (768, 64), (451, 64), (1000, 256), (30, 64), (1, 1)])
def test_axis_runs_cover_every_output_pixel_once(out_size, in_size):
    """Runs split the border cells (longer than the others) so that no run is padded much; each
    output pixel is in exactly one run, of the cell the kernel reads it from."""
    a = upscale.axis(out_size, in_size)
    real = ~a.run_w0_nan.isnan()
    assert torch.equal(torch.sort(a.run_pixels[real]).values, torch.arange(out_size))
    assert torch.equal(a.first[a.run_pixels], a.run_cell[:, None].expand_as(a.run_pixels))
    assert torch.equal(a.run_w0[real], a.w0[a.run_pixels[real]]) and torch.equal(a.run_w1, a.w1[a.run_pixels])
    assert a.run_pixels.shape[1] == -(-out_size // in_size)


def test_masks_above_handle_edge_cases():
    size = (90, 120)
    for logits in (torch.full((2, 64, 64), 5.0), torch.full((2, 64, 64), -5.0), torch.zeros(2, 64, 64)):
        assert torch.equal(masks_above(logits, size), upscale_logits(logits, size) > 0)
    assert masks_above(torch.zeros(0, 64, 64), size).shape == (0, *size)
    batched = smooth_logits(torch.Generator().manual_seed(3), 64, 64, 0.5).reshape(1, 3, 64, 64)  # (B, M, h, w)
    assert torch.equal(masks_above(batched, (768, 1024)), (upscale_logits(batched[0], (768, 1024)) > 0)[None])


@pytest.mark.parametrize("flush_denormals", [False, True])
def test_masks_above_equal_the_reference_at_every_magnitude_the_docstring_names(flush_denormals):
    """Logits of 0 or of magnitude 1e-30 to 1e30, with subnormal numbers flushed (as the server
    has them) and not. (Below that, a weight's product can round to 0 in one and not the other.)"""
    flushing = bool(torch.tensor([1e-40]).mul(1.0).item() == 0.0)  # as the tests before left it
    assert torch.set_flush_denormal(flush_denormals)  # this CPU can flush (x86 and ARM do)
    assert (torch.tensor([1e-40]).mul(1.0).item() == 0.0) == flush_denormals
    try:
        generator = torch.Generator().manual_seed(0)
        for exponent in range(-30, 31):
            magnitude = (0.5 + 0.5 * torch.rand((6, 7, 9), generator=generator)) * 10.0**exponent
            logits = torch.where(torch.rand((6, 7, 9), generator=generator) < 0.5, -magnitude, magnitude)
            logits[0, :3] = 0.0
            for size in ((47, 61), (100, 33)):
                assert upscale.use_cells(logits, size)
                assert torch.equal(masks_above(logits, size), upscale_logits(logits, size) > 0), exponent
    finally:
        torch.set_flush_denormal(flushing)


def test_edge_pixels_are_computed_not_copied(monkeypatch):
    """A disc's edge: without the per-pixel arithmetic (cells copied from a corner) the answer
    differs, so the test above would see a mistake in that arithmetic."""
    if not upscale._exact_on_this_machine():
        pytest.skip("this machine's torch kernel rounds differently: masks_above runs the reference")
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = (15 - ((yy - 30.3) ** 2 + (xx - 25.7) ** 2).sqrt())[None] * 3
    expected = upscale_logits(disc, (768, 1024)) > 0
    assert torch.equal(masks_above(disc, (768, 1024)), expected)
    monkeypatch.setattr(upscale, "_blend", lambda p, q, wp, wq: p.expand(torch.broadcast_shapes(p.shape, wp.shape)))
    assert not torch.equal(masks_above(disc, (768, 1024)), expected)


def test_falls_back_to_the_reference_where_the_kernel_differs(monkeypatch):
    monkeypatch.setattr(upscale, "_exact_on_this_machine", lambda: False)
    calls = []
    monkeypatch.setattr(upscale, "upscale_logits", lambda *args: calls.append(1) or upscale_logits(*args))
    logits = smooth_logits(torch.Generator().manual_seed(0), 64, 64, 0.5)
    assert torch.equal(masks_above(logits, (300, 451)), upscale_logits(logits, (300, 451)) > 0)
    assert calls


@pytest.mark.parametrize("low, size", [s for s in SIZES if upscale.use_cells(torch.zeros(1, *s[0]), s[1])])
def test_stability_and_boxes_equal_sam2s_on_the_upscaled_masks(low, size):
    generator = torch.Generator().manual_seed(sum(low) + sum(size))
    for noise in (0.0, 0.5, 5.0):
        logits = torch.cat([smooth_logits(generator, *low, noise), torch.full((1, *low), -3.0)])  # one empty
        upscaled = upscale_logits(logits, size)
        stability, boxes = stability_and_boxes(logits, size, 0.0, 1.0)
        expected = calculate_stability_score(upscaled, 0.0, 1.0)
        assert torch.equal(stability[:-1], expected[:-1]) and stability[-1].isnan() and expected[-1].isnan()
        assert torch.equal(boxes, batched_mask_to_box(upscaled > 0))
    for value in (5.0, -3.0):  # no cell crossed: nothing to compute at edges
        stability, boxes = stability_and_boxes(torch.full((2, *low), value), size, 0.0, 1.0)
        expected = calculate_stability_score(upscale_logits(torch.full((2, *low), value), size), 0.0, 1.0)
        assert torch.equal(stability, expected) if value > 0 else (stability.isnan().all() and expected.isnan().all())
        assert boxes.tolist() == [[0, 0, size[1] - 1, size[0] - 1] if value > 0 else [0, 0, 0, 0]] * 2


def test_the_pinned_torchs_kernel_is_reproduced():
    """The cell path steps aside where it does not reproduce torch's kernel (torch 2.11's CPU
    kernel rounds differently), and the tests above then compare the reference with itself: on
    the torch the project pins, it must run."""
    pinned = re.search(r"^torch==(\S+)$", (REPO / "requirements.txt").read_text(), re.MULTILINE).group(1)
    if torch.__version__.split("+")[0] != pinned:
        pytest.skip(f"torch {torch.__version__}, not the pinned {pinned}")
    assert upscale._exact_on_this_machine()


def test_the_cell_path_runs_where_cells_are_large(monkeypatch):
    monkeypatch.setattr(upscale, "_exact_on_this_machine", lambda: True)  # the sizes alone
    assert upscale.use_cells(torch.zeros(1, 64, 64), (768, 1024))  # the micro model
    assert not upscale.use_cells(torch.zeros(1, 256, 256), (512, 512))  # an official model on 512 pixels
    assert not upscale.use_cells(torch.zeros(1, 64, 64), (2000, 30))  # downscaling along one axis


def test_boxes_of_faint_masks_equal_sam2s():
    """A mask whose logits stay within +-offset: its box comes from the cells that cross the
    threshold alone (a disc) or from cells wholly above it but below threshold + offset (a mask
    of the whole image at 0.5); both were sam2's boxes only by the cells at other levels."""
    assert upscale.use_cells(torch.zeros(1, 64, 64), (768, 1024))
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    disc = ((15 - ((yy - 30.3) ** 2 + (xx - 25.7) ** 2).sqrt()) / 60)[None]  # within (-1, 1)
    whole = torch.full((1, 64, 64), 0.5)
    logits = torch.cat([disc, whole])
    size = (768, 1024)
    upscaled = upscale_logits(logits, size)
    stability, boxes = stability_and_boxes(logits, size, 0.0, 1.0)
    expected = batched_mask_to_box(upscaled > 0)
    assert expected[1].tolist() == [0, 0, 1023, 767] and 0 < expected[0, 0] < expected[0, 2] < 1023
    assert torch.equal(boxes, expected)
    assert torch.equal(stability, calculate_stability_score(upscaled, 0.0, 1.0))
