"""Masks drawn over their image, as a PNG: the /upload endpoint's answer."""

import io

import numpy as np
from PIL import Image

from .rle import RLE, rles_to_masks


def draw_masks(image: np.ndarray, rles: list[RLE], alpha: float = 0.35, seed: int = 0) -> bytes:
    """PNG of the image with each mask blended in a random colour, largest mask first."""
    canvas = image.astype(np.float32)
    masks = rles_to_masks(rles)
    colours = np.random.default_rng(seed).uniform(0, 255, size=(len(masks), 3)).astype(np.float32)
    for index in np.argsort([-mask.sum() for mask in masks], kind="stable"):
        mask = masks[index]
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colours[index]
    buffer = io.BytesIO()
    Image.fromarray(canvas.round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
