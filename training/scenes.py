"""Procedurally generated scenes with known instance masks: training and held-out data for the
micro SAM2, which has no other data on these offline machines.

A scene is a textured background with overlapping shapes (ellipses, rotated rectangles,
convex polygons, rings) painted in order, each filled with a flat colour, a gradient, stripes
or noise, plus unlabelled clutter (specks and thin lines). An object's mask is the part of its
shape that later shapes leave visible, so occlusion is known by construction.

    scene = make_scene(np.random.default_rng(0))
    scene.image  # (512, 512, 3) uint8
    scene.masks  # (N, 512, 512) bool, one per visible object
"""

from dataclasses import dataclass

import numpy as np

MIN_VISIBLE_FRACTION = 0.004  # objects smaller than this after occlusion are not labelled


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: np.ndarray  # (N, H, W) bool, the visible part of each object, in painting order


def make_scene(
    rng: np.random.Generator, height: int = 512, width: int = 512, min_objects: int = 3, max_objects: int = 9
) -> Scene:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = min(height, width)
    image = _background(rng, yy, xx)
    _clutter(rng, image, yy, xx, scale)

    shapes = []
    for _ in range(rng.integers(min_objects, max_objects + 1)):
        shape = _random_shape(rng, yy, xx, scale)
        if shape.sum() < MIN_VISIBLE_FRACTION * height * width:
            continue
        fill = _fill(rng, yy, xx, avoid=_mean_colour(image, shape))
        image[shape] = fill[shape]
        shapes.append(shape)

    noise = rng.normal(0.0, rng.uniform(0.0, 6.0), image.shape)
    return Scene(image=np.clip(image + noise, 0, 255).astype(np.uint8), masks=visible_masks(shapes, height, width))


def visible_masks(shapes: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """The visible part of each shape painted in this order (what no later shape covers), for
    those large enough to label: (N, H, W) bool."""
    visible, covered = [], np.zeros((height, width), dtype=bool)
    for shape in reversed(shapes):
        visible.append(shape & ~covered)
        covered |= shape
    visible.reverse()
    masks = [m for m in visible if m.sum() >= MIN_VISIBLE_FRACTION * height * width]
    return np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _mean_colour(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return image[mask].mean(axis=0)


def _distinct_colour(rng: np.random.Generator, avoid: np.ndarray, min_distance: float = 80.0) -> np.ndarray:
    """A colour far enough from `avoid` that the object is visible against what it covers."""
    for _ in range(20):
        colour = _random_colour(rng)
        if np.abs(colour - avoid).sum() >= min_distance:
            return colour
    # Each channel at its far end: at least 3 x 127.5 away (255 - avoid is avoid itself for mid grey).
    return np.where(avoid < 127.5, 255.0, 0.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.uniform(0, 1, (cells + 1, cells + 1)).astype(np.float32)
    y = np.linspace(0, cells, height, dtype=np.float32)
    x = np.linspace(0, cells, width, dtype=np.float32)
    y0, x0 = np.minimum(y.astype(int), cells - 1), np.minimum(x.astype(int), cells - 1)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def _gradient(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    return a * (1 - t[..., None]) + b * t[..., None]


def _background(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    a, b = _random_colour(rng), _random_colour(rng)
    image = _gradient(rng, yy, xx, a, b)
    texture = _smooth_noise(rng, *yy.shape, cells=int(rng.integers(2, 12)))
    return image + (texture[..., None] - 0.5) * rng.uniform(0, 80)


def _clutter(rng: np.random.Generator, image: np.ndarray, yy: np.ndarray, xx: np.ndarray, scale: int) -> None:
    """Small unlabelled specks and thin lines: things that are not objects."""
    for _ in range(rng.integers(0, 25)):
        cy, cx = rng.uniform(0, yy.shape[0]), rng.uniform(0, xx.shape[1])
        if rng.random() < 0.5:
            r = rng.uniform(1, max(1.0, 0.012 * scale))  # a pixel at least, in small scenes too
            speck = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            angle = rng.uniform(0, np.pi)
            length = rng.uniform(0.03, 0.15) * scale
            along = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
            across = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
            speck = (np.abs(along) <= length / 2) & (np.abs(across) <= rng.uniform(0.5, 1.5))
        image[speck] = _random_colour(rng)


def _random_shape(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, scale: int, size: float | None = None
) -> np.ndarray:
    """An ellipse, rotated rectangle, convex polygon or ring of about `size` pixels' radius
    (by default 6 to 28 % of the scene's shorter side)."""
    height, width = yy.shape
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    drawn = rng.uniform(0.06, 0.28) * scale  # drawn even when `size` is given: the same random stream
    size = drawn if size is None else size
    angle = rng.uniform(0, np.pi)
    u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
    v = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
    aspect = rng.uniform(0.4, 1.0)
    kind = rng.choice(["ellipse", "rectangle", "polygon", "ring"], p=[0.35, 0.3, 0.25, 0.1])
    if kind == "ellipse":
        return (u / size) ** 2 + (v / (size * aspect)) ** 2 <= 1.0
    if kind == "rectangle":
        return (np.abs(u) <= size) & (np.abs(v) <= size * aspect)
    if kind == "ring":
        r2 = (u / size) ** 2 + (v / (size * aspect)) ** 2
        return (r2 <= 1.0) & (r2 >= rng.uniform(0.25, 0.5))
    # Convex polygon: the intersection of the half-planes of its edges.
    corners = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 7)))
    px, py = size * np.cos(corners), size * aspect * np.sin(corners)
    inside = np.ones_like(u, dtype=bool)
    for i in range(len(corners)):
        x0, y0, x1, y1 = px[i], py[i], px[(i + 1) % len(corners)], py[(i + 1) % len(corners)]
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return inside


def _fill(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, avoid: np.ndarray) -> np.ndarray:
    """An (H, W, 3) float fill: flat, gradient, stripes or noise, visibly unlike `avoid`."""
    a = _distinct_colour(rng, avoid)
    kind = rng.choice(["flat", "gradient", "stripes", "noise"], p=[0.4, 0.25, 0.2, 0.15])
    if kind == "flat":
        return np.broadcast_to(a, (*yy.shape, 3))
    b = np.clip(a + rng.uniform(-60, 60, 3), 0, 255)
    if kind == "gradient":
        return _gradient(rng, yy, xx, a, b)
    if kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        t = (np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * 2 * np.pi / period) > 0).astype(np.float32)
    else:
        t = _smooth_noise(rng, *yy.shape, cells=int(rng.integers(8, 32)))
    return a * (1 - t[..., None]) + b * t[..., None]
