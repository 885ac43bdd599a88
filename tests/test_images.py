"""Safe decoding: every mode to the right RGB, and every bad input to a clear, coded rejection."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from core.images import ImageRejected, open_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgb_jpeg_unchanged():
    arr = np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(arr), "PNG")
    out = open_image(data)
    assert out.mode == "RGB" and out.size == (30, 40)
    assert np.array_equal(np.asarray(out), arr)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP", "JPEG"])
def test_accepted_formats(fmt):
    img = Image.new("RGB", (16, 24), (200, 10, 10))
    out = open_image(_encode(img, fmt))
    assert out.size == (16, 24) and out.mode == "RGB"
    r, g, b = np.asarray(out)[5, 5]
    assert r > 150 and g < 60 and b < 60


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = np.asarray(open_image(_encode(img, "PNG")))
    assert tuple(out[5, 5]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (0, 0, 255)
    la = Image.new("LA", (4, 4), (0, 128))  # half-transparent black on white = mid grey
    assert abs(int(np.asarray(open_image(_encode(la, "PNG")))[0, 0, 0]) - 128) <= 1


def test_palette_with_transparency():
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    data = _encode(img, "PNG", transparency=1)
    assert tuple(np.asarray(open_image(data))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    img = Image.fromarray(arr)
    assert img.mode.startswith("I")
    out = np.asarray(open_image(_encode(img, "PNG")))
    assert abs(int(out[0, 0, 0]) - 128) <= 1


def test_cmyk_and_greyscale():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    r, g, b = np.asarray(open_image(_encode(cmyk, "JPEG")))[4, 4]
    assert r > 200 and g < 60 and b < 60
    grey = Image.new("L", (8, 8), 77)
    assert tuple(np.asarray(open_image(_encode(grey, "PNG")))[0, 0]) == (77, 77, 77)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    out = open_image(_encode(img, "JPEG", exif=exif))
    assert out.size == (10, 20)


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, _ = np.asarray(open_image(buf.getvalue()))[4, 4]
    assert r > 200 and g < 50


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "not_an_image"),
        (b"<html><body>hello</body></html>", "not_an_image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>', "not_an_image"),
        (_png_header_only(50_000, 50_000), "too_many_pixels"),
        (_png_header_only(8000, 6000), "too_many_pixels"),
    ],
)
def test_rejections(data, code):
    with pytest.raises(ImageRejected) as e:
        open_image(data)
    assert e.value.code == code and e.value.message


def test_truncated_jpeg_and_bad_crc_png():
    jpeg = _encode(Image.effect_noise((200, 200), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageRejected) as e:
        open_image(jpeg[: len(jpeg) // 2])
    assert e.value.code == "corrupt_image"
    png = bytearray(_encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG"))
    png[29] ^= 0xFF  # inside IHDR's CRC
    with pytest.raises(ImageRejected) as e:
        open_image(bytes(png))
    assert e.value.code in ("corrupt_image", "not_an_image")


def test_unaccepted_format_is_named():
    data = _encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(ImageRejected) as e:
        open_image(data)
    assert e.value.code == "not_an_image" and "TIFF" in e.value.message


def test_pixel_cap_is_configurable():
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert open_image(data, max_pixels=10_000).size == (100, 100)
    with pytest.raises(ImageRejected):
        open_image(data, max_pixels=9_999)
