"""The vectorized RLE encoder against sam2's reference encoder and pycocotools."""

import io
import tracemalloc

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from sam2serve.overlay import draw_masks
from sam2serve.rle import answer_text, masks_to_rle_reference, masks_to_rle_vectorized, rle_area, rles_to_masks


def edge_case_masks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    one_pixel_first = np.zeros((5, 7), bool)
    one_pixel_first[0, 0] = True
    one_pixel_last = np.zeros((5, 7), bool)
    one_pixel_last[-1, -1] = True
    one_pixel_middle = np.zeros((5, 7), bool)
    one_pixel_middle[2, 3] = True
    blob = np.zeros((33, 17), bool)
    blob[5:20, 3:11] = True
    return {
        "random": rng.random((4, 31, 47)) < 0.5,
        "sparse": rng.random((3, 64, 48)) < 0.02,
        "empty": np.zeros((2, 9, 11), bool),
        "full": np.ones((2, 9, 11), bool),
        "one_pixel": np.stack([one_pixel_first, one_pixel_last, one_pixel_middle]),
        "single_row": rng.random((2, 1, 40)) < 0.5,
        "single_column": rng.random((2, 40, 1)) < 0.5,
        "one_by_one": np.array([[[True]], [[False]]]),
        "blob": blob[None],
        "mixed": np.stack([np.zeros((6, 5), bool), np.ones((6, 5), bool), rng.random((6, 5)) < 0.5]),
    }


@pytest.mark.parametrize("name", sorted(edge_case_masks()))
def test_vectorized_rle_matches_reference_and_pycocotools(name):
    masks = edge_case_masks()[name]
    n, h, w = masks.shape
    ours = masks_to_rle_vectorized(torch.from_numpy(masks))
    assert ours == masks_to_rle_reference(torch.from_numpy(masks))
    for mask, rle in zip(masks, ours):
        assert rle["size"] == [h, w]
        assert sum(rle["counts"]) == h * w
        # pycocotools' own encoding of the same mask, compared in its compressed form.
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert mask_utils.frPyObjects(rle, h, w)["counts"] == expected["counts"]
        assert rle_area(rle) == mask.sum()
    np.testing.assert_array_equal(rles_to_masks(ours), masks)


def test_first_count_is_background():
    full = masks_to_rle_vectorized(torch.ones((1, 2, 3), dtype=torch.bool))[0]
    assert full["counts"] == [0, 6]
    empty = masks_to_rle_vectorized(torch.zeros((1, 2, 3), dtype=torch.bool))[0]
    assert empty["counts"] == [6]


def test_column_major_order():
    # Set pixel (row 0, col 1): in column-major order it is the 3rd pixel of a 2x3 mask.
    mask = torch.zeros((1, 2, 3), dtype=torch.bool)
    mask[0, 0, 1] = True
    assert masks_to_rle_vectorized(mask)[0]["counts"] == [2, 1, 3]


def test_run_lengths_hold_no_copy_of_the_masks():
    """Each chunk's run lengths are kept until the last chunk's: a view of the masks' copy among
    them held every chunk's (7 GB on a 3 MP image with the filters off)."""
    from sam2serve.rle import rle_run_lengths

    masks = torch.zeros((4, 300, 200), dtype=torch.bool)
    masks[:, 10:20, 30:40] = True
    for part in rle_run_lengths(masks):
        assert part.untyped_storage().nbytes() < 300 * 200, part.shape


def test_no_masks():
    assert masks_to_rle_vectorized(torch.zeros((0, 4, 4), dtype=torch.bool)) == []


@pytest.mark.parametrize("shape", [(2, 0, 5), (2, 5, 0)])
def test_masks_of_no_pixels_encode_as_pycocotools_does(shape):
    masks = np.zeros(shape, bool)
    ours = masks_to_rle_vectorized(torch.from_numpy(masks))
    expected = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [mask_utils.frPyObjects(rle, *shape[1:])["counts"] for rle in ours] == [e["counts"] for e in expected]
    assert [rle["size"] for rle in ours] == [list(shape[1:])] * 2
    assert rles_to_masks(ours).shape == shape


def test_overlay_draws_what_all_masks_at_once_drew_with_one_mask_in_memory():
    """/upload's picture: the masks decoded one at a time (all at once, every filter off, took
    gigabytes for one request), the same PNG as the drawing of all of them decoded together."""
    rng = np.random.default_rng(0)
    n, h, w = 120, 90, 130
    corners = rng.integers(0, [h, w, h, w], size=(n, 4))
    masks = np.zeros((n, h, w), bool)
    for mask, (y0, x0, y1, x1) in zip(masks, corners):
        mask[min(y0, y1):max(y0, y1) + 1, min(x0, x1):max(x0, x1) + 1] = True
    rles = masks_to_rle_vectorized(torch.from_numpy(masks))
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    # The drawing as it was: every mask decoded first, then blended largest first.
    expected = image.astype(np.float32)
    colours = np.random.default_rng(0).uniform(0, 255, size=(n, 3)).astype(np.float32)
    for index in np.argsort([-mask.sum() for mask in masks], kind="stable"):
        expected[masks[index]] = 0.65 * expected[masks[index]] + 0.35 * colours[index]

    def drawn_with_peak(rles: list) -> tuple[bytes, int]:
        tracemalloc.start()
        try:
            return draw_masks(image, rles), tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    draw_masks(image, rles[:1])  # what a first call imports and caches is not the masks' memory
    png, peak = drawn_with_peak(rles)
    drawn = np.array(Image.open(io.BytesIO(png)))
    assert np.array_equal(drawn, expected.round().astype(np.uint8))
    # Ten times the masks, about the same memory (the image's canvas, one mask); all at once
    # took two bytes per pixel per mask more: 240 per pixel for these 120.
    assert peak < drawn_with_peak(rles[:12])[1] + 20 * h * w, peak
    assert draw_masks(image, []) == draw_masks(image, [], seed=1)  # no mask: the image alone
    assert np.array_equal(np.array(Image.open(io.BytesIO(draw_masks(image, [])))), image)


def test_the_upload_rle_body_is_compact_json_in_the_masks_order():
    """No spaces and no newline (a million images' answers are a million lines, each as short as
    it can be), masks keyed mask_0, mask_1, ... in their order."""
    masks = torch.zeros((2, 2, 3), dtype=torch.bool)
    masks[0, 0, 1] = True
    masks[1] = True
    rles = masks_to_rle_vectorized(masks)
    text = answer_text(rles)
    assert text == '{"mask_0":{"size":[2,3],"counts":[2,1,3]},"mask_1":{"size":[2,3],"counts":[0,6]}}'
    assert answer_text([]) == "{}"
