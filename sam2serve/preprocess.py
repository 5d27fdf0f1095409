"""Image bytes -> RGB array -> model input tensor.

Decoding checks what a server must check before spending memory on pixels: empty input,
data that is not an image (or not in one of the raster formats it reads), truncated files, and
images with too many pixels or too long a side (read from the header, before the pixels are
decoded, so a small file that expands to gigabytes is refused).
"""

import contextlib
import io
import os
import threading
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import ExifTags, Image, UnidentifiedImageError

# SAM2's normalisation (ImageNet statistics), as in sam2.utils.transforms.SAM2Transforms.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


# Pillow refuses to open an image of more pixels than this (its decompression-bomb guard, twice
# Image.MAX_IMAGE_PIXELS), before any limit of ours is checked: no limit can go above it.
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS

# Images read from the user's own files (the study's scripts, the benchmark): no server limit,
# only one against absurd sizes.
FILE_MAX_PIXELS = 100_000_000

# The longest side an image may have, whatever its pixel count. The resize to the model's square
# input runs along rows first, through a (3, height, resolution) float buffer (12 KiB per row at
# 1024), and masks' boxes read arrays as long as a side for each mask: a 1x40,000,000 image,
# within the pixel limit, would ask for 491 GB or hold the model for minutes. 16384 keeps phone
# panoramas.
MAX_SIDE = 16384


# The raster formats images are read in, as Pillow names them (JPEG includes cameras' MPO files).
# Pillow reads more, but some hand the file to another program (EPS to Ghostscript, long a way in
# for attackers), decode the pixels before their size can be checked (ICO, whose header may say
# 16x16 over an embedded PNG of 13000x13000) or are rarely seen outside their niche: a server that
# takes files from anyone reads these alone (and the scripts read files as it reads uploads).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF", "JPEG2000", "PPM", "TGA")
Image.init()
READ_FORMATS = tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)  # AVIF where this Pillow has it
FORMATS_TEXT = ", ".join("WebP" if name == "WEBP" else name for name in READ_FORMATS)
# ISO base media brands of HEIC/HEIF, as phones save photos: no Pillow plugin reads them.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs")


class DecodeBudget:
    """Memory the decodes under way may take at once, in bytes: a decode waits until its share is
    free (at most the whole budget: an image that needs more decodes alone), first come, first
    served (a large share waited for good while smaller ones kept overlapping). A server's HTTP
    threads decode uploads as they arrive, before the queue: 17 uploads of 40 MP decoding at once
    took over 8 GB, and the server was killed."""

    def __init__(self, total_bytes: int) -> None:
        self.total_bytes, self.taken = total_bytes, 0
        self.tickets, self.serving = 0, 0  # the next waiter's number, and the number served next
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def share(self, nbytes: int):
        nbytes = min(nbytes, self.total_bytes)
        with self.changed:
            ticket, self.tickets = self.tickets, self.tickets + 1
            self.changed.wait_for(lambda: ticket == self.serving and self.taken + nbytes <= self.total_bytes)
            self.taken += nbytes
            self.serving += 1
            self.changed.notify_all()  # the next waiter may fit beside this one
        try:
            yield
        finally:
            with self.changed:
                self.taken -= nbytes
                self.changed.notify_all()


# What a decode takes per pixel at most (the RGB answer, 3 bytes, and Pillow's and numpy's copies
# on the way: +534 MiB for a 40 MP JPEG, +954 MiB for a 32-bit TIFF), and for all decodes at once.
DECODE_BYTES_PER_PIXEL = 24
DECODING = DecodeBudget(2 << 30)


class InvalidImage(ValueError):
    """The upload is not a decodable image."""


class ImageTooLarge(ValueError):
    """The image has more pixels than the server accepts."""


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decodes image file bytes to an (H, W, 3) uint8 RGB array, EXIF orientation applied."""
    if not data:
        raise InvalidImage("the file is empty")
    with contextlib.ExitStack() as decoding:  # its share of DECODING, from the header's checks to the array
        try:
            image = opened_and_decoded(data, max_pixels, decoding)
        except ImageTooLarge:
            raise
        except Image.DecompressionBombError as error:
            raise ImageTooLarge(f"image has more than {PILLOW_MAX_PIXELS} pixels; the limit is {max_pixels} pixels") \
                from error
        except UnidentifiedImageError as error:
            heif = data[4:8] == b"ftyp" and data[8:12] in HEIF_BRANDS
            raise InvalidImage(f"the file is not an image in one of the formats read: {FORMATS_TEXT}"
                               + ("; it is HEIC/HEIF: save it as JPEG or PNG" if heif else "")
                               + tiff_hint(data)) from error
        except MemoryError:
            raise
        except Exception as error:  # a damaged file: OSError mostly, but Pillow's TIFF reader raises
            # TypeError, OverflowError and others on some damaged tags
            raise InvalidImage(f"the image could not be decoded: {error}") from error
        return to_rgb(image)  # outside: an error of the project's own conversion is no fault of the file's


def opened_and_decoded(data: bytes, max_pixels: int, decoding: contextlib.ExitStack) -> Image.Image:
    """decode_image's Pillow image: its size checked from the header, then decoded and turned
    upright once it holds its share of DECODING (entered on `decoding`, held until the array)."""
    with Image.open(io.BytesIO(data), formats=READ_FORMATS) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageTooLarge(f"image is {width}x{height} = {width * height} pixels; "
                                f"the limit is {max_pixels} pixels")
        if max(width, height) > MAX_SIDE:
            raise ImageTooLarge(f"image is {width}x{height}: a side is longer than the limit of {MAX_SIDE} pixels")
        if image.format == "TIFF":  # Pillow's decoder takes a tile's buffer whole, however small the picture
            require_small_tiles(image)
        decoding.enter_context(DECODING.share(width * height * DECODE_BYTES_PER_PIXEL))  # before any pixel
        if image.info.get("default_image"):  # an APNG's still picture for viewers that do not animate:
            image.seek(1)  # browsers show the animation's first frame, so that is the image (seek decodes)
        # Pillow reads a PGM of more than 8 bits as 32-bit "I", scaled to 0..65535: 16 bits
        sixteen_bits = image.format == "PPM" and image.mode == "I"
        image.load()  # the pixels: a damaged file fails here
        image = upright(image)
        return image.convert("I;16") if sixteen_bits else image


def require_small_tiles(image: Image.Image) -> None:
    """A TIFF's tiles no larger than its picture, or than 1024x1024 (a 155-byte file of 16x16
    pixels declared tiles of 25984x25984: 2 GB to decode it, and five at once ended the server)."""
    tile_width, tile_height = image.tag_v2.get(322, 0), image.tag_v2.get(323, 0)  # TileWidth, TileLength
    width, height = image.size
    if tile_width * tile_height > max(width * height, 1 << 20):
        raise InvalidImage(f"the TIFF's tiles are {tile_width}x{tile_height} pixels, larger than its {width}x{height} "
                           "picture: a damaged or hostile file")


# How exif_transpose turns an image of each EXIF orientation.
TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def upright(image: Image.Image) -> Image.Image:
    """A copy of the image turned by its orientation, as exif_transpose turns it (EXIF's, or
    XMP's where EXIF has none). exif_transpose also rewrites the EXIF, which fails on an entry of
    another type than Pillow expects (a ResolutionUnit as a fraction): that photo was served
    unturned. EXIF Pillow fails to read (a PNG's EXIF text that is not hexadecimal, or
    compressed) turns nothing, as in browsers: such a valid picture was refused as damaged."""
    try:
        method = TRANSPOSES.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 (Pillow's EXIF reading raises ValueError, TypeError, SyntaxError, ...)
        method = None
    return image.copy() if method is None else image.transpose(method)


# Bytes of one value of each TIFF type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., LONG8, SLONG8, IFD8).
TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8,
                   18: 8}


def tiff_hint(data: bytes) -> str:
    """Why Pillow could not open a file that starts as a TIFF does ("" for other files): cut short
    (its first directory, which libtiff writes after the pixels, lies past the end) or a pixel
    format Pillow does not read."""
    if data[:4] not in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return ""
    big = data[2:4] in (b"+\0", b"\0+")  # BigTIFF: offsets and counts of 8 bytes, entries of 20
    order = "little" if data[:2] == b"II" else "big"
    first_directory = int.from_bytes(data[8:16] if big else data[4:8], order)
    count_size, entry_size, offset_size = (8, 20, 8) if big else (2, 12, 4)
    entries = int.from_bytes(data[first_directory:first_directory + count_size], order)
    end = first_directory + count_size + entries * entry_size + offset_size  # the next directory's offset last
    if len(data) < (16 if big else 8) or end > len(data):
        return "; it is a TIFF cut short (its first directory does not end within the file)"
    for entry in range(first_directory + count_size, end - offset_size, entry_size):  # values kept after it
        kind = int.from_bytes(data[entry + 2:entry + 4], order)
        size = TIFF_TYPE_SIZES.get(kind, 0) * int.from_bytes(data[entry + 4:entry + 4 + offset_size], order)
        at = entry + 4 + offset_size  # after the tag, type and count: the value, or its offset
        if size > offset_size and int.from_bytes(data[at:at + offset_size], order) + size > len(data):
            return "; it is a TIFF cut short (a value of its first directory lies past the file's end)"
    return ("; it is a TIFF whose pixel format is not read (such as 16- or 64-bit floats, or colour in floats): "
            "save it with 8- or 16-bit integers, or as grayscale of 32-bit floats")


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB, as an upload would be decoded."""
    return decode_image(Path(path).read_bytes(), FILE_MAX_PIXELS)


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Grayscale of 32-bit integers or floats (TIFF, mostly: microscopy, depth, remote sensing).
WIDE_MODES = ("I", "F")
PREMULTIPLIED_MODES = {"La": "LA", "RGBa": "RGBA"}  # colour already multiplied by alpha -> plain alpha


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> (H, W, 3) uint8 RGB.

    Grayscale, palette and CMYK go through Pillow's own conversion. Transparent pixels are laid
    over white, as a viewer shows them: dropping alpha would segment colours nobody sees (cut-outs
    often keep the old background under alpha 0). Grayscale wider than 8 bits is rescaled:
    Pillow's conversion would clip it at 255, which turns most such images white or black
    (wide_gray_to_8_bits).
    """
    if image.mode in SIXTEEN_BIT_MODES + WIDE_MODES:
        values = np.asarray(image)
        gray = wide_gray_to_8_bits(values, image.mode)
        keyed = image.info.get("transparency")  # one gray value keyed out (a 16-bit PNG's tRNS)
        if isinstance(keyed, (int, float)) and not isinstance(keyed, bool):
            gray[values == keyed] = 255
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in PREMULTIPLIED_MODES:  # a TIFF's associated alpha: Pillow converts these to their plain form only
        image = image.convert(PREMULTIPLIED_MODES[image.mode])
    if image.mode == "P" or "transparency" in image.info:
        try:
            image = image.convert("RGBA")  # palettes, and PNGs with one colour keyed out, carry it
        except ValueError as error:  # a PNG's tRNS with more entries than its palette has colours
            raise InvalidImage(f"the image could not be decoded: its transparency does not fit its palette "
                               f"({error})") from error
    if "A" in image.getbands():
        image = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def wide_gray_to_8_bits(values: np.ndarray, mode: str) -> np.ndarray:
    """Grayscale wider than 8 bits -> uint8. 16-bit images by their type's range (65535 -> 255,
    as a photo's 16 bits mean); 32-bit ones by the range their values use, since the type says
    nothing of it: integers as 8 or 16 bits where they fit in them (else their minimum to maximum
    spread over 0..255), floats as 0..1 or 0..255 where they fit in them (else spread the same
    way). Values that are not numbers (NaN, infinities) become 0."""
    values = values.astype(np.float32)  # 8 bits out: float32's 24 bits of precision are plenty
    finite = np.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    floats = mode == "F"
    offset = 0.0
    if mode in SIXTEEN_BIT_MODES:
        scale = 1 / 257
    elif low >= 0 and high <= (1 if floats else 255):
        scale = 255.0 if floats else 1.0
    elif low >= 0 and high <= (255 if floats else 65535):
        scale = 1.0 if floats else 1 / 257
    else:
        offset, scale = low, (255.0 / (high - low) if high > low else 0.0)
    scaled = (values - offset) * scale
    scaled[~finite] = 0.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def image_to_input(image: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (1, 3, R, R) float32, resized and normalised as SAM2 expects.

    Same operations, in the same order, as the `sam2` package's SAM2Transforms (ToTensor,
    antialiased bilinear Resize, Normalize), so the image encoder sees identical input.
    """
    tensor = TF.to_tensor(image)  # (3, H, W) in [0, 1]
    tensor = TF.resize(tensor, [resolution, resolution], antialias=True)
    tensor = TF.normalize(tensor, PIXEL_MEAN, PIXEL_STD)
    return tensor[None]


class ImageToInputOnDevice:
    """image_to_input with the work done on the device: only the uint8 pixels are copied there.

    The same operations as image_to_input (the reference beside it), in the same order; cast
    to `dtype` (the model's) at the end. SAM2's mean and std are put on the device once:
    torchvision's normalize makes them for every image and checks that no std is zero
    (`(std == 0).any()`), which on a GPU waits for the device's answer, for constants known here.
    """

    def __init__(self, resolution: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> None:
        self.resolution, self.dtype = resolution, dtype
        self.mean, self.std = (torch.tensor(values, device=device).view(3, 1, 1) for values in (PIXEL_MEAN, PIXEL_STD))

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(image).to(self.mean.device).permute(2, 0, 1).float().div(255)
        tensor = TF.resize(tensor, [self.resolution, self.resolution], antialias=True)
        return tensor.sub(self.mean).div(self.std)[None].to(self.dtype)  # TF.normalize's operations
