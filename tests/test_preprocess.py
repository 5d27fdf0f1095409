"""Decoding uploads and preparing the model input."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from sam2.utils.transforms import SAM2Transforms

from sam2serve.preprocess import PILLOW_MAX_PIXELS, ImageTooLarge, InvalidImage, decode_image, image_to_input


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_every_image_mode_becomes_rgb(mode):
    array = decode_image(encode(Image.new(mode, (7, 5))), max_pixels=100)
    assert array.shape == (5, 7, 3) and array.dtype == np.uint8


def test_sixteen_bit_grayscale_is_rescaled_not_clipped():
    values = np.array([[0, 257, 32896], [65535, 1000, 40000]], dtype=np.uint16)
    array = decode_image(encode(Image.fromarray(values)), max_pixels=100)
    expected = np.rint(values / 257).astype(np.uint8)
    assert array.dtype == np.uint8 and array.shape == (2, 3, 3)
    assert (array == expected[..., None]).all()  # Pillow's convert("RGB") would give 255 for most


def test_palette_and_alpha_keep_their_colours():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # transparent red
    assert (decode_image(encode(Image.fromarray(rgba, "RGBA")), max_pixels=100)[..., 0] == 200).all()
    palette = Image.fromarray(np.full((4, 4, 3), (10, 120, 230), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    assert (decode_image(encode(palette), max_pixels=100) == (10, 120, 230)).all()


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (8, 4), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    assert decode_image(encode(image, "JPEG", exif=exif), max_pixels=100).shape == (8, 4, 3)


def test_pixel_limit_is_checked_before_decoding():
    data = encode(Image.new("L", (101, 100)))
    assert decode_image(data, max_pixels=101 * 100).shape == (100, 101, 3)
    with pytest.raises(ImageTooLarge, match="10100 pixels"):
        decode_image(data, max_pixels=101 * 100 - 1)


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height (its checksum mended)."""
    data = bytearray(encode(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_images_beyond_pillows_own_guard_get_the_servers_message():
    with pytest.raises(ImageTooLarge, match="50000000 pixels; the limit is 40000000 pixels"):
        decode_image(png_claiming(50000, 1000), max_pixels=40_000_000)
    # Past Pillow's decompression-bomb guard Pillow refuses it first; the message is still ours.
    with pytest.raises(ImageTooLarge, match=f"more than {PILLOW_MAX_PIXELS} pixels; the limit is 40000000 pixels"):
        decode_image(png_claiming(20000, 10000), max_pixels=40_000_000)


@pytest.mark.parametrize("data", [b"", b"GIF89a not really", encode(Image.new("RGB", (64, 64)))[:60]])
def test_undecodable_input_is_invalid(data):
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=10**6)


def test_model_input_equals_sam2_transforms(scene):
    expected = SAM2Transforms(resolution=1024, mask_threshold=0.0)(scene)
    assert torch.equal(image_to_input(scene, 1024)[0], expected)
