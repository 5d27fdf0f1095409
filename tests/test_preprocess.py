"""Decoding uploads and preparing the model input."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from sam2.utils.transforms import SAM2Transforms

from sam2serve.preprocess import (
    MAX_SIDE, PILLOW_MAX_PIXELS, READ_FORMATS, ImageTooLarge, InvalidImage, decode_image, image_to_input, to_rgb,
)

from .test_worker import wait_for


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


GRAY = (np.arange(48 * 64) % 256).reshape(48, 64).astype(np.uint8)  # every 8-bit value


@pytest.mark.parametrize("name, values", [
    ("floats 0..1", GRAY.astype(np.float32) / 255),
    ("floats 0..255", GRAY.astype(np.float32)),
    ("floats of another range", GRAY.astype(np.float32) * 4 - 1000),
    ("32-bit integers 0..255", GRAY.astype(np.int32)),
    ("32-bit integers 0..65535", GRAY.astype(np.int32) * 257),
    ("32-bit integers of the whole range", (GRAY.astype(np.int64) * 16843009 - 2**31).astype(np.int32)),
])
def test_thirty_two_bit_grayscale_is_read_by_the_range_it_uses(name, values):
    """TIFFs of 32-bit integers or floats (microscopy, depth): Pillow's conversion clipped them at
    0..255, so that floats of 0..1 and small integers went black, and wider ones white."""
    image = Image.fromarray(values)
    assert image.mode in ("I", "F")
    decoded = decode_image(encode(image, "TIFF"), max_pixels=10**6)
    assert (decoded == GRAY[..., None]).all(), name


def test_grayscale_that_is_not_a_number_becomes_black():
    values = np.array([[np.nan, 0.5], [np.inf, 1.0]], dtype=np.float32)
    decoded = decode_image(encode(Image.fromarray(values), "TIFF"), max_pixels=100)
    assert decoded[..., 0].tolist() == [[0, 128], [0, 255]]
    constant = decode_image(encode(Image.fromarray(np.full((2, 2), -7, np.int32)), "TIFF"), max_pixels=100)
    assert (constant == 0).all()


def test_transparent_pixels_are_laid_over_white_and_palettes_keep_their_colours():
    """What a viewer shows is what is segmented: a cut-out's hidden background becomes white."""
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, :, 3], rgba[1, :, 3], rgba[2:, :, 3] = 0, 128, 255  # transparent, half, opaque red
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA")), max_pixels=100).astype(int)
    assert (decoded[0] == 255).all() and (decoded[2:] == (200, 0, 0)).all()
    assert np.abs(decoded[1] - (227, 127, 127)).max() <= 1  # halfway between red and white
    gray = np.stack([np.full((4, 4), 30, np.uint8), np.full((4, 4), 0, np.uint8)], axis=-1)
    assert (decode_image(encode(Image.fromarray(gray, "LA")), max_pixels=100) == 255).all()
    colours = np.zeros((4, 4, 3), dtype=np.uint8)
    colours[:2], colours[2:] = (10, 120, 230), (250, 40, 0)
    palette = Image.fromarray(colours).convert("P", palette=Image.Palette.ADAPTIVE, colors=2)
    palette.info["transparency"] = palette.getpixel((0, 3))  # the bottom colour is see-through
    decoded = decode_image(encode(palette), max_pixels=100)
    assert (decoded[:2] == (10, 120, 230)).all() and (decoded[2:] == 255).all()
    keyed = encode(Image.fromarray(colours), transparency=(250, 40, 0))  # one RGB colour keyed out, no alpha
    decoded = decode_image(keyed, max_pixels=100)
    assert (decoded[:2] == (10, 120, 230)).all() and (decoded[2:] == 255).all()


def with_associated_alpha(tiff: bytes) -> bytes:
    """A TIFF of Pillow's with its alpha marked associated (ExtraSamples 1: colour premultiplied)."""
    data = bytearray(tiff)
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", data[ifd:ifd + 2])[0], 12):
        if struct.unpack("<H", data[entry:entry + 2])[0] == 338:  # ExtraSamples, one value: 2 (plain alpha)
            data[entry + 8:entry + 10] = struct.pack("<H", 1)
            return bytes(data)
    raise AssertionError("no ExtraSamples tag")


def test_premultiplied_alpha_is_laid_over_white_too():
    """Gray with associated alpha (a TIFF that Pillow opens as mode La) answered 500: Pillow has no
    conversion from La to RGB. Premultiplied 100 at alpha 128 over white: 100 + (255 - 128)."""
    data = with_associated_alpha(encode(Image.new("LA", (3, 2), (100, 128)), "TIFF"))
    assert Image.open(io.BytesIO(data)).mode == "La"  # the case, as Pillow reads it
    assert np.abs(decode_image(data, max_pixels=100).astype(int) - 227).max() <= 1
    rgba = to_rgb(Image.new("RGBa", (3, 2), (100, 50, 0, 128))).astype(int)
    assert np.abs(rgba - (227, 177, 127)).max() <= 1


def test_a_palette_whose_transparency_is_longer_than_it_is_refused_as_damaged():
    """A PNG's tRNS with more entries than any palette has (257) answered 500 (Pillow's
    "palette index out of range"): the file is damaged, 400."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    def palette_png(transparency: bytes) -> bytes:
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 3, 0, 0, 0))
                + chunk(b"PLTE", bytes([255, 0, 0, 0, 0, 255])) + chunk(b"tRNS", transparency)
                + chunk(b"IDAT", zlib.compress(b"\0\0\1" * 2)) + chunk(b"IEND", b""))

    assert (decode_image(palette_png(b"\xff\x00"), max_pixels=100)[:, 1] == 255).all()  # the file, mended
    with pytest.raises(InvalidImage, match="transparency does not fit its palette"):
        decode_image(palette_png(b"\x80" * 257), max_pixels=100)


def test_a_keyed_out_gray_value_of_sixteen_bits_is_laid_over_white_too():
    """A 16-bit grayscale PNG with one value keyed out (tRNS) took the rescaling's way, which
    dropped the transparency (value 0 keyed: black where a viewer shows white)."""
    values = np.array([[0, 1028, 65535], [0, 30000, 0]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(values), transparency=0), max_pixels=100)
    assert decoded[..., 0].tolist() == [[255, 4, 255], [255, 117, 255]]
    keyed = decode_image(encode(Image.fromarray(values), transparency=30000), max_pixels=100)
    assert keyed[..., 0].tolist() == [[0, 4, 255], [0, 255, 0]]


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


def test_a_side_longer_than_the_limit_is_refused_from_the_header():
    """A thin image within the pixel limit would cost the resize gigabytes (a float buffer per
    row) and the boxes minutes: refused whichever side is long, before decoding."""
    assert decode_image(encode(Image.new("L", (MAX_SIDE, 2))), max_pixels=10**6).shape == (2, MAX_SIDE, 3)
    for width, height in ((MAX_SIDE + 1, 1), (1, 40_000_000)):
        with pytest.raises(ImageTooLarge, match=f"image is {width}x{height}: a side is longer than the limit of "
                                                f"{MAX_SIDE} pixels"):
            decode_image(png_claiming(width, height), max_pixels=40_000_000)


@pytest.mark.parametrize("data", [b"", b"GIF89a not really", encode(Image.new("RGB", (64, 64)))[:60]])
def test_undecodable_input_is_invalid(data):
    with pytest.raises(InvalidImage):
        decode_image(data, max_pixels=10**6)


def tiff_with_damaged_tag() -> bytes:
    """A small TIFF whose StripOffsets tag (273) claims the type RATIONAL instead of LONG:
    Pillow's reader then raises TypeError, not one of its usual errors for damaged files."""
    data = encode(Image.new("RGB", (7, 9)), "TIFF")
    entry = data.index(struct.pack("<HH", 273, 4))
    return data[:entry] + struct.pack("<HH", 273, 5) + data[entry + 4:]


def test_a_damaged_file_that_trips_pillow_elsewhere_is_invalid_too():
    """Any error of Pillow's on a damaged file is the file's fault (400), not the server's
    (it was a 500 answer, and a bulk job's or the study's traceback)."""
    with pytest.raises(InvalidImage, match="could not be decoded: 'IFDRational' object cannot be interpreted"):
        decode_image(tiff_with_damaged_tag(), max_pixels=10**6)


def test_raster_formats_are_read_and_others_refused_with_the_list():
    """Each format the server reads decodes; EPS, which Pillow would hand to Ghostscript, and
    HEIC, which no plugin reads, are refused by name, with the formats that are read."""
    image = Image.new("RGB", (32, 16), (200, 30, 30))
    assert {"JPEG", "PNG", "WEBP", "TIFF"} <= set(READ_FORMATS)
    for name in READ_FORMATS:
        data = io.BytesIO()
        image.save(data, name)
        decoded = decode_image(data.getvalue(), 10**6)
        centre = decoded[decoded.shape[0] // 2, decoded.shape[1] // 2].astype(int)
        assert decoded.ndim == 3 and np.abs(centre - (200, 30, 30)).max() < 12, name
    eps = io.BytesIO()
    image.save(eps, "EPS")
    with pytest.raises(InvalidImage, match="not an image in one of the formats read: JPEG, PNG, ") as refused:
        decode_image(eps.getvalue(), 10**6)
    assert "Ghostscript" not in str(refused.value)
    # ICO: Pillow decodes its largest icon while opening it, before the size could be checked
    # (the header may claim 16x16 over an embedded PNG of any size).
    ico = io.BytesIO()
    image.save(ico, "ICO", sizes=[(16, 16)])
    with pytest.raises(InvalidImage, match="not an image in one of the formats read"):
        decode_image(ico.getvalue(), 10**6)
    heic = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(64)  # the start of an iPhone photo
    with pytest.raises(InvalidImage, match="it is HEIC/HEIF: save it as JPEG or PNG"):
        decode_image(heic, 10**6)
    # A TIFF of a pixel format Pillow does not read (here 16-bit floats): said so.
    tiff = bytearray(encode(Image.fromarray(np.zeros((4, 4), np.float32)), "TIFF"))
    ifd = struct.unpack("<I", tiff[4:8])[0]
    for entry in range(ifd + 2, ifd + 2 + 12 * struct.unpack("<H", tiff[ifd:ifd + 2])[0], 12):
        if struct.unpack("<H", tiff[entry:entry + 2])[0] == 258:  # BitsPerSample: 32 -> 16
            tiff[entry + 8:entry + 10] = struct.pack("<H", 16)
    with pytest.raises(InvalidImage, match="it is a TIFF whose pixel format is not read"):
        decode_image(bytes(tiff), 10**6)


def test_model_input_equals_sam2_transforms(scene):
    expected = SAM2Transforms(resolution=1024, mask_threshold=0.0)(scene)
    assert torch.equal(image_to_input(scene, 1024)[0], expected)


def test_an_error_in_the_conversion_after_decoding_is_not_blamed_on_the_file(monkeypatch):
    """Only Pillow's decoding turns any error into the file's fault (400): a bug in the
    project's own conversion stays a bug (500, its traceback logged)."""
    from sam2serve import preprocess

    def broken(values, mode):
        raise IndexError("a bug of the conversion")

    monkeypatch.setattr(preprocess, "wide_gray_to_8_bits", broken)
    with pytest.raises(IndexError, match="a bug of the conversion"):
        decode_image(encode(Image.fromarray(np.zeros((2, 3), np.uint16))), max_pixels=100)


def test_running_out_of_memory_while_decoding_is_not_blamed_on_the_file(monkeypatch):
    """MemoryError passes through: the server's error (500), not the file's (400, "could not be decoded")."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 4)).save(buffer, "PNG")

    def out_of_memory(image):
        raise MemoryError("no room for the pixels")

    monkeypatch.setattr(Image.Image, "getexif", out_of_memory)  # while reading the orientation
    with pytest.raises(MemoryError):
        try:
            decode_image(buffer.getvalue(), max_pixels=100)
        except InvalidImage as error:
            pytest.fail(f"a MemoryError became InvalidImage: {error}")


def test_decodes_under_way_take_at_most_their_budget_of_memory_at_once(monkeypatch):
    """Each decode holds DECODE_BYTES_PER_PIXEL bytes a pixel of the budget from its header's
    checks to its array; one over the budget waits for the others, one larger than the whole runs
    alone (17 uploads of 40 MP decoding at once on the HTTP threads took over 8 GB)."""
    import threading

    from sam2serve import preprocess

    shares = []
    budget = preprocess.DecodeBudget(1000)
    original_share = budget.share
    monkeypatch.setattr(budget, "share", lambda nbytes: shares.append(nbytes) or original_share(nbytes))
    monkeypatch.setattr(preprocess, "DECODING", budget)
    assert decode_image(encode(Image.new("RGB", (8, 4))), max_pixels=100).shape == (4, 8, 3)
    assert shares == [8 * 4 * preprocess.DECODE_BYTES_PER_PIXEL] and budget.taken == 0
    with pytest.raises(ImageTooLarge):  # refused from the header: no share taken
        decode_image(encode(Image.new("RGB", (20, 10))), max_pixels=100)
    assert len(shares) == 1
    entered, release = threading.Event(), threading.Event()

    def second():
        with original_share(400):
            entered.set()
            release.wait(10)

    with original_share(700):
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        assert not entered.wait(0.3)  # 700 + 400 > 1000: it waits
    assert entered.wait(10) and budget.taken == 400
    release.set()
    thread.join(10)
    assert budget.taken == 0
    with original_share(10**9):  # more than the whole: the whole, alone
        assert budget.taken == 1000
    # First come, first served: a decode that fits does not pass one waiting for more (a large
    # share waited for good while smaller ones kept overlapping).
    order, release = [], threading.Event()

    def waiting(name, nbytes):
        with original_share(nbytes):
            order.append(name)
            release.wait(10)

    with original_share(700):
        tickets = budget.tickets
        large = threading.Thread(target=waiting, args=("large", 1000), daemon=True)
        large.start()
        wait_for(lambda: budget.tickets == tickets + 1)  # waiting, in line
        small = threading.Thread(target=waiting, args=("small", 100), daemon=True)  # 700 + 100 fits; comes second
        small.start()
        wait_for(lambda: budget.tickets == tickets + 2)
        time.sleep(0.3)
        assert order == []
    wait_for(lambda: order != [])
    time.sleep(0.3)
    assert order == ["large"]
    release.set()
    large.join(10)
    small.join(10)
    assert order == ["large", "small"] and budget.taken == 0
    # An APNG's seek to its still picture decodes a frame: the share is held before it.
    steps = []
    monkeypatch.setattr(budget, "share", lambda nbytes: steps.append("share") or original_share(nbytes))
    from PIL import PngImagePlugin as png_plugin

    seek = png_plugin.PngImageFile.seek
    monkeypatch.setattr(png_plugin.PngImageFile, "seek",
                        lambda image, frame: steps.append("seek") or seek(image, frame))
    frames = [Image.new("RGB", (6, 4), colour) for colour in ("white", "red")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], default_image=True)
    decode_image(buffer.getvalue(), max_pixels=100)
    assert steps[:2] == ["share", "seek"], steps


def tiled_tiff(side: int, tile: int) -> bytes:
    """A side x side RGB TIFF of black pixels, deflated, in tiles of tile x tile (its one tile's data
    of side x side pixels: what matters is what its tags declare)."""
    data = zlib.compress(bytes(3 * tile * tile if tile <= 64 else 3 * side * side))
    tags = [(256, 4, side), (257, 4, side), (258, 3, None), (259, 3, 8), (262, 3, 2), (277, 3, 3),
            (322, 4, tile), (323, 4, tile), (324, 4, None), (325, 4, len(data))]
    after = 8 + 2 + 12 * len(tags) + 4  # the bits per sample (3 shorts), then the tile's data
    out = b"II*\0" + struct.pack("<IH", 8, len(tags))
    for tag, kind, value in tags:
        count, value = {258: (3, after), 324: (1, after + 6)}.get(tag, (1, value))
        out += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                        else struct.pack("<I", value))
    return out + struct.pack("<I", 0) + struct.pack("<HHH", 8, 8, 8) + data


def test_a_tiff_whose_tiles_are_larger_than_its_picture_is_refused_before_decoding():
    """Pillow's decoder takes a tile's buffer whole: a 16x16 TIFF declaring tiles of 25984x25984
    (155 bytes) cost 2 GB to decode, five at once ended the server. Tiles larger than a small
    picture, up to 1024x1024, are no such file."""
    assert decode_image(tiled_tiff(16, 16), max_pixels=1000).shape == (16, 16, 3)
    assert decode_image(tiled_tiff(16, 32), max_pixels=1000).shape == (16, 16, 3)
    with pytest.raises(InvalidImage, match="the TIFF's tiles are 4096x4096 pixels, larger than its 16x16 picture"):
        decode_image(tiled_tiff(16, 4096), max_pixels=1000)


def test_sixteen_bit_ranges_of_integers_that_start_at_zero_keep_their_scale():
    """32-bit integers within 0..65535 are read as 16 bits (v / 257), also when the darkest is 0:
    a dim image stays dim, not stretched to full range."""
    values = np.array([[0, 1000], [257, 514]], dtype=np.int32)
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "TIFF")
    decoded = decode_image(buffer.getvalue(), max_pixels=100)
    assert decoded[..., 0].tolist() == [[0, 4], [1, 2]]
    floats = np.array([[0.0, 100.0], [2.0, 255.0]], dtype=np.float32) / 2  # 0..127.5: as 0..255
    buffer = io.BytesIO()
    Image.fromarray(floats).save(buffer, "TIFF")
    assert decode_image(buffer.getvalue(), max_pixels=100)[..., 0].tolist() == [[0, 50], [1, 128]]


def test_a_pgm_of_sixteen_bits_is_rescaled_as_sixteen_bits_whatever_values_it_holds():
    """Pillow reads a PGM of more than 8 bits as 32-bit integers scaled to 0..65535: one whose
    values all fit in 8 bits was taken as 8-bit data, 257 times too bright."""
    values = np.array([[0, 230, 257], [1000, 40000, 65535]], dtype=np.uint16)
    pgm = b"P5\n3 2\n65535\n" + values.astype(">u2").tobytes()
    expected = np.rint(values / 257).astype(np.uint8)
    assert (decode_image(pgm, max_pixels=100) == expected[..., None]).all()
    dark = np.full((2, 3), 230, np.uint16)  # every value within 8 bits
    assert (decode_image(b"P5\n3 2\n65535\n" + dark.astype(">u2").tobytes(), max_pixels=100) == 1).all()


def test_an_animated_png_s_still_picture_for_other_viewers_is_not_the_image():
    """An APNG may carry a default image that is not part of its animation, for viewers that do
    not animate; browsers (the web page too) show the animation's first frame: so does the server."""
    frames = [Image.new("RGB", (6, 4), colour) for colour in ("white", "red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:], default_image=True)
    assert (decode_image(buffer.getvalue(), max_pixels=100) == (255, 0, 0)).all()
    buffer = io.BytesIO()  # without one, the first frame is the animation's
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    assert (decode_image(buffer.getvalue(), max_pixels=100) == 255).all()


def test_a_tiff_cut_short_is_said_to_be_cut_short_not_of_a_pixel_format_not_read():
    """libtiff writes a TIFF's first directory after its pixels: a compressed TIFF cut short has
    none, and Pillow cannot tell its format; the hint blamed the pixel format."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    whole = encode(Image.fromarray(noise), "TIFF", compression="tiff_lzw")
    with pytest.raises(InvalidImage, match=r"it is a TIFF cut short \(its first directory does not end"):
        decode_image(whole[:len(whole) // 2], 10**6)


def test_a_tiff_cut_within_its_directory_or_its_header_is_said_to_be_cut_short():
    noise = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    for options in ({"compression": "tiff_lzw"}, {}):
        whole = encode(Image.fromarray(noise), "TIFF", **options)
        for cut in (10, 60, 120):
            with pytest.raises(InvalidImage, match=r"it is a TIFF cut short"):
                decode_image(whole[:-cut] if options else whole[:cut], 10**6)
    with pytest.raises(InvalidImage, match=r"it is a TIFF cut short"):
        decode_image(b"II*\0", 10**6)


def test_exif_pillow_cannot_read_turns_nothing_and_refuses_no_valid_picture():
    """A PNG's EXIF in a "Raw profile type exif" text that is not hexadecimal, or in a compressed
    text named "exif": Pillow's exif_transpose raised, and the picture was refused as damaged
    (browsers show it)."""
    picture = Image.new("RGB", (6, 4), (10, 200, 30))
    for keyword, text, zipped in [("Raw profile type exif", "\nexif\n       4\nzz zz\n", False), ("exif", "x", True)]:
        info = PngImagePlugin.PngInfo()
        info.add_text(keyword, text, zip=zipped)
        decoded = decode_image(encode(picture, pnginfo=info), max_pixels=100)
        assert decoded.shape == (4, 6, 3) and (decoded == (10, 200, 30)).all(), keyword


def test_a_photo_whose_exif_pillow_cannot_write_back_is_turned_all_the_same():
    """exif_transpose turns the picture, then rewrites its EXIF without the orientation, which
    fails on an entry of another type than Pillow expects (here ResolutionUnit as a fraction):
    such a photo was served unturned, while browsers (and the web page) turn it."""
    entries = [(0x0112, 3, 1, struct.pack(">HH", 6, 0)), (0x0128, 5, 1, struct.pack(">I", 38))]
    directory = struct.pack(">H", 2) + b"".join(struct.pack(">HHI", *entry[:3]) + entry[3] for entry in entries)
    exif = b"Exif\0\0MM\0*" + struct.pack(">I", 8) + directory + struct.pack(">I", 0) + struct.pack(">II", 5, 2)
    picture = Image.new("RGB", (4, 2), (200, 30, 30))
    decoded = decode_image(encode(picture, "JPEG", exif=exif, quality=95), max_pixels=100)
    assert decoded.shape == (4, 2, 3)  # a quarter turn


def test_a_tiff_cut_within_the_values_its_directory_points_to_is_said_to_be_cut_short():
    picture = Image.new("RGB", (8, 4), (1, 2, 3))
    whole = encode(picture, "TIFF", description="x" * 3000)  # a long value, kept after the directory
    with pytest.raises(InvalidImage, match=r"it is a TIFF cut short \(a value of its first directory lies past"):
        decode_image(whole[:150], 10**6)
