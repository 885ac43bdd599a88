"""Decoding untrusted images safely into RGB, for uploads and for the banner folder alike.

Whatever goes wrong is an ``ImageRejected`` with a stable code. Any mode becomes RGB as a viewer shows it
(transparency on white, 16-bit greyscale scaled, EXIF orientation applied; an animation's first frame).

The cost is bounded from the header before any pixel is decoded: the pixel cap, an aspect-ratio cap and, given
the caller's resize (``resize_to``), a cap on the resized size (a 1 x 40000 image becomes 256 x 10,240,000 under
``dino``'s resize). A JPEG's scans are counted from its markers (a progressive file can repeat empty scans by the
thousand), and one much larger than needed is decoded at a reduced DCT scale; a WebP's canvas is checked from its
header, since libwebp allocates it as the file is opened. ``core.isolated`` enforces the memory budget.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, JpegImagePlugin, MpoImagePlugin, UnidentifiedImageError, WebPImagePlugin  # noqa: F401

Image.preinit()  # with the two plugins above, those of ALLOWED_FORMATS: registered here, not in each decoding child

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
JPEG_FORMATS = ("JPEG", "MPO")  # Pillow opens a JPEG with a multi-picture header as MPO
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: far above any banner, far below a bomb
MAX_ASPECT_RATIO = 20  # long edge / short edge; banners are 2:3, wide capsules about 2:1
MAX_RESIZED_PIXELS = 2_000_000  # after the model's resize (dino at 20:1 gives 256 x 5120 = 1.3 Mpx)
MAX_JPEG_SCANS = 64  # progressive JPEGs use about 10; libjpeg has no limit of its own
MAX_JPEG_SCAN_WORK = 1_000_000_000  # scans x pixels: each scan is a pass over every block of its components
DECODE_BYTES_PER_PIXEL = 5  # a decode's memory per pixel of the cap: an RGBA PNG at the cap holds 4
WEBP_BYTES_PER_PIXEL = 16  # libwebp's two RGBA canvases (even for a still image) and Pillow's two copies
ORIENTATIONS = {  # EXIF orientation -> the transpose that shows the image as a viewer does (ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
QUARTER_TURNS = tuple(ORIENTATIONS[o] for o in (5, 6, 7, 8))  # shown as height x width
BAND_ROWS = 64  # rows shrunk at a time: a mode conversion's copies cost a band, not the image
SIGNATURES = {  # leading bytes -> format, to name a file without handing it to every Pillow plugin
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG": "PNG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"8BPS": "PSD",
    b"\x00\x00\x01\x00": "ICO",
    b"%PDF": "PDF",
}


class ImageRejected(ValueError):
    """An input that is not an acceptable image; ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def open_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode source (bytes or a path) into a fully loaded RGB image; ``info["source_size"]``: the (width, height)
    shown, before any reduction. ``resize_to(width, height)``, the size the caller will resize to, bounds the
    resized size and lets a huge image be decoded or shrunk to no less than twice that size."""
    data = source if isinstance(source, bytes | bytearray) else Path(source).read_bytes()
    img = _open(data, max_pixels)
    width, height = img.size
    target = check_geometry(width, height, resize_to)
    if img.format in JPEG_FORMATS:
        _bound_jpeg(img, data, target, max_pixels)
    img = _load(img, data)
    method = None
    with contextlib.suppress(Exception):  # malformed EXIF: keep the stored orientation, do not reject
        method = ORIENTATIONS.get(img.getexif().get(ExifTags.Base.Orientation))
    turned = method in QUARTER_TURNS
    out = _reduce_to_rgb(img, resize_to, turned)
    if method is not None:  # applied here, not by exif_transpose: it fails on EXIF that Pillow cannot rewrite
        out = out.transpose(method)
        for key in ("exif", "Raw profile type exif", "xmp", "XML:com.adobe.xmp"):  # their orientation is applied
            out.info.pop(key, None)
    out.info["source_size"] = (height, width) if turned else (width, height)
    return out


def _bound_jpeg(
    img: JpegImagePlugin.JpegImageFile, data: bytes, target: tuple[int, int] | None, max_pixels: int
) -> None:
    """Bound a JPEG's (or MPO's) decoding work: scans counted, a huge one decoded at a reduced DCT scale, and a
    progressive one's buffer of every coefficient counted against the budget."""
    width, height = img.size
    check_jpeg_scans(data, width * height)
    side = 2 * max(target) if target is not None else 0  # square: the same whatever the EXIF rotation
    if side and side <= min(width, height):
        img.draft(None, (side, side))  # DCT scaling: 1/2..1/8 of the work and memory
    if img.info.get("progressive"):
        check_progressive_jpeg([(h, v) for _, h, v, _ in img.layer], width, height, img.size, max_pixels)


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Pillow's image of the header, its size checked against the pixel caps; nothing decoded yet."""
    if canvas := webp_canvas(data[:30]):  # before Pillow opens it: libwebp allocates its canvases as the file is opened
        check_memory(f"a {canvas[0]}x{canvas[1]} WebP", canvas[0] * canvas[1] * WEBP_BYTES_PER_PIXEL, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageRejected("too_many_pixels", f"image has too many pixels; the limit is {max_pixels:,}") from None
    except UnidentifiedImageError:
        found = image_format(data)
        what = "not a recognised image" if found in (None, *ALLOWED_FORMATS) else f"{found} images are not accepted"
        raise ImageRejected("not_an_image", f"{what}; send one of: {', '.join(ALLOWED_FORMATS)}") from None
    except MemoryError:
        raise
    except Exception as e:  # a header Pillow recognised but could not parse
        raise ImageRejected("corrupt_image", f"image header could not be read: {e}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected("corrupt_image", f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejected(
            "too_many_pixels", f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    return img


def decode_budget(max_pixels: int) -> tuple[int, str]:
    """The memory a decode may use (bytes), and that rule in words: ``DECODE_BYTES_PER_PIXEL`` per pixel of the cap."""
    rule = f"{DECODE_BYTES_PER_PIXEL} bytes per pixel of the {max_pixels:,}-pixel limit"
    return max_pixels * DECODE_BYTES_PER_PIXEL, rule


def check_memory(what: str, needed: int, max_pixels: int) -> None:
    """Refuse a decode known to need more than its memory budget."""
    budget, rule = decode_budget(max_pixels)
    if needed > budget:
        limit = f"the limit is {budget / 1e6:,.0f} MB ({rule})"
        raise ImageRejected("too_many_pixels", f"{what} takes {needed / 1e6:,.0f} MB to decode; {limit}")


def check_progressive_jpeg(
    sampling: list[tuple[int, int]], width: int, height: int, out: tuple[int, int], max_pixels: int
) -> None:
    """Refuse a progressive JPEG whose decode exceeds the budget: libjpeg's buffer of the whole image's DCT
    coefficients (64 x 16 bits per block of each component, ``sampling``: each one's (h, v) factors), then the
    ``out`` (width, height) output."""
    h_max, v_max = max(h for h, _ in sampling), max(v for _, v in sampling)
    blocks = sum(-(-width * h // (8 * h_max)) * -(-height * v // (8 * v_max)) for h, v in sampling)
    check_memory(f"a {width}x{height} progressive JPEG", blocks * 128 + 4 * out[0] * out[1], max_pixels)


def webp_canvas(head: bytes) -> tuple[int, int] | None:
    """A WebP's canvas (width, height) from its first 30 bytes; None for anything else."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8X":  # extended (animation, alpha): 24-bit canvas sizes minus one
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L":  # lossless: 14-bit sizes minus one, after the 0x2f signature
        bits = int.from_bytes(head[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 ":  # lossy: 14-bit sizes after the start code
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    return None


def image_format(data: bytes) -> str | None:
    """The format named by a file's leading bytes (a few common ones), without parsing it."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


def check_geometry(
    width: int, height: int, resize_to: Callable[[int, int], tuple[int, int]] | None = None
) -> tuple[int, int] | None:
    """Refuse extreme aspect ratios and absurd resized sizes; returns the resized (width, height), if known."""
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageRejected(
            "extreme_aspect_ratio",
            f"image is {width}x{height}, an aspect ratio of {ratio:,.0f}:1; the limit is {MAX_ASPECT_RATIO}:1",
        )
    if resize_to is None:
        return None
    rw, rh = resize_to(width, height)
    if rw * rh > MAX_RESIZED_PIXELS:
        raise ImageRejected(
            "too_large_after_resize",
            f"image is {width}x{height}, which the model's preprocessing resizes to {rw}x{rh} = {rw * rh:,} pixels; "
            f"the limit is {MAX_RESIZED_PIXELS:,}",
        )
    return rw, rh


def _reduce_to_rgb(
    img: Image.Image, resize_to: Callable[[int, int], tuple[int, int]] | None, turned: bool = False
) -> Image.Image:
    """RGB; an image many times larger than needed is also shrunk by an integer factor (box filter) to at least
    twice the resized size (of the image as shown: ``turned`` a quarter by its EXIF orientation), in bands each
    converted first, so that a conversion's copies cost a band."""
    factor = 1
    if resize_to is not None:
        tw, th = resize_to(img.width, img.height) if not turned else resize_to(img.height, img.width)[::-1]
        factor = min(img.width // (2 * tw), img.height // (2 * th))
    if factor < 2:
        return to_rgb(img)
    out = Image.new("RGB", (-(-img.width // factor), -(-img.height // factor)))
    rows = max(factor, BAND_ROWS - BAND_ROWS % factor)  # whole boxes of the reduction
    for top in range(0, img.height, rows):
        band = to_rgb(img.crop((0, top, img.width, min(img.height, top + rows))))
        out.paste(band.reduce(factor), (0, top // factor))
    return out


def check_jpeg_scans(data: bytes, pixels: int) -> int:
    """Refuse a JPEG with more scans than the decode-work budget allows, counting every ``FF DA`` pair wherever
    it sits: entropy-coded data never holds it, so this bounds the scans of any JPEG stream inside (MPO, EXIF)."""
    limit = min(MAX_JPEG_SCANS, max(1, MAX_JPEG_SCAN_WORK // max(1, pixels)))
    scans = data.count(b"\xff\xda")
    if scans > limit:
        raise ImageRejected(
            "too_much_decoding_work",
            f"JPEG has {scans} scans for {pixels:,} pixels; the limit is {limit} here ({MAX_JPEG_SCANS} scans and "
            f"{MAX_JPEG_SCAN_WORK:,} scan-pixels; progressive JPEGs normally have about 10)",
        )
    return scans


def _load(img: Image.Image, data: bytes) -> Image.Image:
    """Decode the pixels (the first frame); any failure of the data is a ``corrupt_image``."""
    try:
        if img.format == "PNG":
            # Pillow checks the data chunks' CRC only in verify(), which leaves the image unusable: reopen it.
            img.verify()
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        img.seek(0)  # first frame of an animation
        img.load()
    except MemoryError:
        raise
    except Exception as e:  # truncated data, bad checksums, broken streams
        raise ImageRejected("corrupt_image", f"image data is corrupt or truncated: {e}") from None
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16/32-bit greyscale rescaled to 8 bits."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:  # an RGB PNG's tRNS: a colour shown transparent
        return img
    if mode.startswith("I") or mode == "F":
        raw = np.asarray(img, dtype=np.float64)
        arr = raw / 257.0 if mode.startswith("I;16") or (mode == "I" and raw.max(initial=0) > 255) else raw
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        if isinstance(key := img.info.get("transparency"), int):  # a 16-bit grey PNG's tRNS
            grey[raw == key] = 255  # transparent, on white
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
