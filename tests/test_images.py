"""Safe decoding: every mode to the right RGB, and every bad input to a clear, coded rejection."""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib

import numpy as np
import pytest
from hostile_images import animated_webp, gif_canvas, junk_before_scans, mpo, scan_bomb
from PIL import Image

from core.dino.preprocess import PREPROCESSINGS
from core.images import ImageRejected, open_image, to_rgb, webp_canvas

DINO = PREPROCESSINGS["dino"].pil_resized_size


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
    assert out.size == (10, 20) and out.info["source_size"] == (10, 20)


def test_a_rotated_image_is_shrunk_by_its_size_as_shown():
    """A fixed, non-square resize (``full``'s 224 x 336) bounds the image as shown, not as stored: no less than
    twice that size."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = open_image(_encode(Image.new("RGB", (2000, 3000)), "PNG", exif=exif), resize_to=lambda w, h: (224, 336))
    assert out.size == (1500, 1000) and out.info["source_size"] == (3000, 2000)


def test_source_size_of_a_rotated_image_shrunk_to_a_square():
    """The size as shown is the rotated one even when the reduced image is square (its shape does not tell)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = open_image(_encode(Image.new("RGB", (1000, 999)), "PNG", exif=exif), resize_to=lambda w, h: (60, 60))
    assert out.size == (125, 125) and out.info["source_size"] == (999, 1000)


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


# -- decoding work and memory, bounded from the header ---------------------------------------------------


@pytest.mark.parametrize(
    "bomb",
    [
        scan_bomb(1000, 500, junk=b"\x00"),  # a junk byte before every scan
        scan_bomb(1000, 500, junk=b"\xab", junk_first=False),  # between scans only
        scan_bomb(1000, 500, junk=b"\xff\xff"),  # fill bytes before every marker
        mpo((1000, 1000), scans=500),  # inside an MPO: a JPEG with a multi-picture header
    ],
    ids=["junk-before", "junk-between", "fill-bytes", "mpo"],
)
def test_jpeg_scan_bombs_are_refused_however_the_scans_hide(bomb):
    with pytest.raises(ImageRejected) as e:
        open_image(bomb)
    assert e.value.code == "too_much_decoding_work" and "the limit is 64" in e.value.message


def test_junk_before_the_scans_of_an_ordinary_progressive_jpeg_is_skipped_as_libjpeg_does():
    banner = _encode(Image.effect_noise((300, 450), 60).convert("RGB"), "JPEG", progressive=True)
    assert np.array_equal(np.asarray(open_image(junk_before_scans(banner))), np.asarray(open_image(banner)))


def test_an_mpo_is_decoded_as_a_jpeg_first_picture_reduced_scale_included():
    data = mpo((4000, 3000))
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = open_image(data, resize_to=DINO)
    assert out.size == (1000, 750) and out.info["source_size"] == (4000, 3000)  # DCT scaling, as for a JPEG
    assert open_image(mpo((600, 900)), resize_to=DINO).size == (600, 900)


def test_a_progressive_jpeg_counts_its_coefficient_buffer_against_the_memory_budget():
    tall = _encode(Image.new("RGB", (447, 8940), (90, 120, 30)), "JPEG", progressive=True)  # 4 Mpx at 20:1
    with pytest.raises(ImageRejected) as e:  # the cap's budget: 5 bytes per pixel of 4 Mpx = 20 MB
        open_image(tall, max_pixels=4_000_000, resize_to=DINO)
    assert e.value.code == "too_many_pixels" and "progressive JPEG takes 28 MB" in e.value.message
    assert "the limit is 20 MB" in e.value.message
    square = _encode(Image.new("RGB", (2000, 2000), (90, 120, 30)), "JPEG", progressive=True)
    assert open_image(square, max_pixels=4_000_000, resize_to=DINO).size == (1000, 1000)  # decoded at 1/2


@pytest.mark.parametrize(
    ("image", "kw"),
    [
        (Image.new("RGB", (123, 457), (1, 2, 3)), {"quality": 80}),  # VP8
        (Image.new("RGB", (123, 457), (1, 2, 3)), {"lossless": True}),  # VP8L
        (Image.new("RGBA", (123, 457), (1, 2, 3, 4)), {"quality": 80}),  # VP8X, alpha
    ],
    ids=["lossy", "lossless", "extended"],
)
def test_a_webp_canvas_is_read_from_its_header_as_pillow_reads_it(image, kw):
    data = _encode(image, "WEBP", **kw)
    assert webp_canvas(data[:30]) == Image.open(io.BytesIO(data)).size == (123, 457)
    assert webp_canvas(animated_webp(7001, 5003)[:30]) == (7001, 5003)
    assert webp_canvas(_encode(image, "PNG")[:30]) is None


def test_an_animated_webp_over_its_cap_is_refused_before_pillow_opens_it():
    with pytest.raises(ImageRejected) as e:  # 1000 frames of 1x1 on a 6000x6600 canvas: 48 KB
        open_image(animated_webp(6000, 6600))
    assert e.value.code == "too_many_pixels"
    assert "6000x6600 WebP takes 634 MB to decode; the limit is 200 MB" in e.value.message


def test_only_the_first_frame_of_an_animation_is_decoded():
    out = open_image(animated_webp(300, 200, frames=1000))
    assert out.size == (300, 200) and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((150, 100)) == (255,) * 3
    gif = open_image(gif_canvas(3000, 2000, frames=1000), resize_to=DINO)
    assert gif.info["source_size"] == (3000, 2000) and gif.size == (1000, 667)


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "I;16"])
def test_a_large_image_is_shrunk_in_bands_exactly_as_whole(mode):
    rng = np.random.default_rng(1)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65535, (1030, 1100), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (1030, 1100, len(mode)), dtype=np.uint8).squeeze(), mode)
    data = _encode(img, "PNG", compress_level=1, **({"transparency": 3} if mode == "P" else {}))
    out = open_image(data, resize_to=DINO)  # 273x256 wanted: shrunk by 2, in bands of 64 rows
    whole = to_rgb(Image.open(io.BytesIO(data))).reduce(2)
    assert out.size == (550, 515) and np.array_equal(np.asarray(out), np.asarray(whole))


def test_pixel_limits_in_messages_are_the_services_own():
    for data in (_png_header_only(20_000, 10_000), _png_header_only(10_000, 9_000)):  # over Pillow's two limits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ImageRejected) as e:
                open_image(data)
        assert e.value.code == "too_many_pixels" and "the limit is 40,000,000" in e.value.message
        assert "178,956,970" not in e.value.message and "89478485" not in e.value.message
        assert caught == []  # no DecompressionBombWarning for a refusal


def test_a_refused_format_is_named_from_its_bytes_without_a_log_line(caplog):
    tiff_header = b"II*\x00\x08\x00\x00\x00\x01\x00\x00\x01\x04\x00\x01\x00\x00\x00\xff\xff\xff\x7f" + b"\0" * 40
    refused = [(_encode(Image.new("RGB", (8, 8)), "TIFF"), "TIFF"), (tiff_header, "TIFF")]
    caplog.set_level(logging.DEBUG)
    for data, name in refused:
        with pytest.raises(ImageRejected) as e:
            open_image(data)
        assert e.value.code == "not_an_image" and e.value.message.startswith(f"{name} images are not accepted")
    assert caplog.records == []


def test_a_colour_keyed_rgb_png_is_composited_on_white():
    """An RGB (or 16-bit grey) PNG whose tRNS chunk makes one colour transparent (what PNG optimisers such as
    oxipng write for a cut-out with a single transparent colour) shows that colour as transparent, on white."""
    arr = np.zeros((1030, 1100, 3), np.uint8)
    arr[:, 550:] = (200, 30, 30)
    data = _encode(Image.fromarray(arr), "PNG", transparency=(0, 0, 0), compress_level=1)
    for out in (open_image(data), open_image(data, resize_to=DINO)):  # whole, and shrunk in bands
        assert tuple(np.asarray(out)[5, 5]) == (255, 255, 255)
        assert tuple(np.asarray(out)[5, -5]) == (200, 30, 30)
    grey = np.full((8, 8), 32768, np.uint16)
    grey[:4] = 0
    out = np.asarray(open_image(_encode(Image.fromarray(grey), "PNG", transparency=0)))
    assert tuple(out[0, 0]) == (255, 255, 255) and abs(int(out[-1, -1, 0]) - 128) <= 1


def _exif_with_an_unwritable_tag(orientation: int) -> bytes:
    """EXIF that Pillow reads (Orientation included) but cannot write back: XResolution typed UNDEFINED."""
    entries = [(0x0112, 3, 1, struct.pack("<HH", orientation, 0)), (0x011A, 7, 4, b"H\x00\x00\x00")]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries)
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_when_other_exif_tags_cannot_be_rewritten(fmt):
    exif = _exif_with_an_unwritable_tag(6)
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # top left as stored: top right as shown
    data = _encode(img, fmt, exif=exif)
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6
    out = open_image(data)
    assert out.size == (20, 40) and out.info["source_size"] == (20, 40)
    assert out.getpixel((17, 2)) == (255, 0, 0) if fmt == "PNG" else out.getpixel((17, 2))[0] > 200
    big = open_image(_encode(img.resize((2400, 1200)), fmt, exif=exif), resize_to=DINO)  # shrunk, then turned
    assert big.size == (600, 1200) and big.info["source_size"] == (1200, 2400)
