"""Masks drawn over their image, as a PNG: the /upload endpoint's answer."""

import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .rle import RLE, rle_area, rle_to_mask


def draw_masks(image: np.ndarray, rles: list[RLE], alpha: float = 0.35, seed: int = 0) -> bytes:
    """PNG of the image with each mask blended in a random colour, largest mask first.

    The masks are decoded one at a time (all at once take two bytes per pixel per mask: every
    filter off, 3072 masks of a 1024x768 image, 4.8 GB), and each is blended within its box
    only: outside it no pixel is set, and reading every pixel of the image for every mask took
    most of the time (200 masks on a 1024x768 image: 0.44 s, 0.10 s within their boxes)."""
    canvas = image.astype(np.float32)
    colours = np.random.default_rng(seed).uniform(0, 255, size=(len(rles), 3)).astype(np.float32)
    height, width = image.shape[:2]
    boxes = mask_utils.toBbox(mask_utils.frPyObjects(rles, height, width)).astype(int) if rles else []
    for index in np.argsort([-rle_area(rle) for rle in rles], kind="stable"):
        x, y, box_width, box_height = boxes[index]
        region = canvas[y:y + box_height, x:x + box_width]  # a view: blended in place
        mask = rle_to_mask(rles[index])[y:y + box_height, x:x + box_width]
        region[mask] = (1 - alpha) * region[mask] + alpha * colours[index]
    buffer = io.BytesIO()
    Image.fromarray(canvas.round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
