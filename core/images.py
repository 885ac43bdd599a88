"""Decoding images safely into RGB, for uploads and for the banner folder alike.

Everything that can go wrong with an untrusted file is turned into an
``ImageRejected`` with a stable code: not an image at all, a format we do not
accept, more pixels than allowed (checked from the header, before any pixel
is decoded, so decompression bombs cost nothing), or a corrupt/truncated
file. Any mode is converted to RGB the way a viewer would show it:
transparency composited on white, 16-bit greyscale scaled rather than
clipped, EXIF orientation applied.

Cost is bounded before any pixel is decoded, from the header alone: the pixel
cap, an aspect-ratio cap and, when the caller says how the image will be
resized (``resize_to``), a cap on the resized size (a 1 x 40000 image is tiny
but becomes 256 x 10,240,000 under ``dino``'s shorter-edge resize). For JPEGs
the scans are counted from the markers (a progressive file can repeat empty
scans by the thousand, each a pass over every block), and a JPEG much larger
than needed is decoded at a reduced DCT scale (``draft``).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: far above any banner, far below a bomb
MAX_ASPECT_RATIO = 20  # long edge / short edge; banners are 2:3, wide capsules about 2:1
MAX_RESIZED_PIXELS = 2_000_000  # after the model's resize (dino at 20:1 gives 256 x 5120 = 1.3 Mpx)
MAX_JPEG_SCANS = 64  # progressive JPEGs use about 10; libjpeg has no limit of its own
MAX_JPEG_SCAN_WORK = 1_000_000_000  # scans x pixels: each scan is a pass over every block of its components


class ImageRejected(ValueError):
    """An input that is not an acceptable image; ``code`` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def open_image(
    source: bytes | str | Path | BinaryIO,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    formats: tuple[str, ...] = ALLOWED_FORMATS,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """Decode source (bytes, a path or a binary file) into a fully loaded RGB image.

    ``resize_to(width, height)`` is the (width, height) the caller will resize to (see
    ``core.dino.preprocess``): it bounds the resized size, and lets a huge JPEG be decoded
    at a reduced scale that is still at least twice that size.
    """
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=list(formats))
    except FileNotFoundError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("too_many_pixels", f"image has too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ImageRejected("not_an_image", _unidentified_message(source, formats)) from None
    except Exception as e:  # a header Pillow recognised but could not parse
        raise ImageRejected("corrupt_image", f"image header could not be read: {e}") from None
    try:
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageRejected("corrupt_image", f"image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageRejected(
                "too_many_pixels", f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
            )
        target = check_geometry(width, height, resize_to)
        if img.format == "JPEG":
            check_jpeg_scans(_read_all(source, fp), width * height)
            side = 2 * max(target) if target is not None else 0  # square: the same whatever the EXIF rotation
            if side and side <= min(width, height):
                img.draft(None, (side, side))  # DCT scaling: 1/2..1/8 of the work and memory
        img = _load(img, source, fp, formats)
        scale = width / img.width  # > 1 after a draft
        with contextlib.suppress(Exception):  # malformed EXIF: keep the stored orientation, do not reject
            img = ImageOps.exif_transpose(img)
        shown = (round(img.width * scale), round(img.height * scale))
        out = to_rgb(_reduce_for(img, resize_to))
        out.info["source_size"] = shown  # (width, height) as shown, before any reduction
        return out
    finally:
        if fp is not source:
            fp.close()


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


def _reduce_for(img: Image.Image, resize_to: Callable[[int, int], tuple[int, int]] | None) -> Image.Image:
    """Shrink an image many times larger than needed by an integer factor (box filter), keeping at least
    twice the resized size: the mode conversions that follow (alpha on white: three full-size copies)
    then cost a fraction of the memory. Banners of ordinary sizes are left exactly as they are."""
    if resize_to is None:
        return img
    tw, th = resize_to(img.width, img.height)
    factor = min(img.width // (2 * tw), img.height // (2 * th))
    if factor < 2:
        return img
    try:
        return img.reduce(factor)
    except ValueError:  # a mode reduce() does not support (palette): convert at full size instead
        return img


def check_jpeg_scans(data: bytes, pixels: int) -> int:
    """Bound a JPEG's scans by its SOS markers (no decoding); refuse more than the decode-work budget allows.

    Every ``FF DA`` pair in the bytes is counted, wherever it sits: libjpeg finds each next marker by
    skipping whatever precedes an 0xFF, so junk between segments hides no scan from it, and
    entropy-coded data never holds the pair (its 0xFF bytes are followed by 0x00 or a restart marker).
    The count is an upper bound on the scans libjpeg decodes, in a JPEG and in any container of JPEG
    streams (MPO, EXIF thumbnails), at memory speed.
    """
    limit = min(MAX_JPEG_SCANS, max(1, MAX_JPEG_SCAN_WORK // max(1, pixels)))
    scans = data.count(b"\xff\xda")
    if scans > limit:
        raise ImageRejected(
            "too_much_decoding_work",
            f"JPEG has {scans} scans for {pixels:,} pixels; the limit is {limit} here ({MAX_JPEG_SCANS} scans and "
            f"{MAX_JPEG_SCAN_WORK:,} scan-pixels; progressive JPEGs normally have about 10)",
        )
    return scans


def _read_all(source: object, fp: object) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    if isinstance(source, str | Path):
        return Path(source).read_bytes()
    position = fp.tell()
    fp.seek(0)
    data = fp.read()
    fp.seek(position)
    return data


def _load(img: Image.Image, source: object, fp: object, formats: tuple[str, ...]) -> Image.Image:
    """Decode the pixels (the first frame); any failure of the data is a ``corrupt_image``."""
    try:
        if img.format == "PNG":
            # Pillow checks the CRC of image data chunks only in verify(), which leaves the
            # image unusable: verify the chunks (no decompression), then open it again.
            img.verify()
            img = _reopen(source, fp, formats)
        img.seek(0)  # first frame of an animation
        img.load()
    except Exception as e:  # truncated data, bad checksums, broken streams
        raise ImageRejected("corrupt_image", f"image data is corrupt or truncated: {e}") from None
    return img


def _reopen(source: object, fp: object, formats: tuple[str, ...]) -> Image.Image:
    if isinstance(source, str | Path):
        return Image.open(source, formats=list(formats))
    fp.seek(0)
    return Image.open(fp, formats=list(formats))


def _unidentified_message(source: object, formats: tuple[str, ...]) -> str:
    accepted = ", ".join(formats)
    fp = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        if hasattr(fp, "seek"):
            fp.seek(0)
        with Image.open(fp) as other:
            return f"{other.format} images are not accepted; send one of: {accepted}"
    except Exception:
        return f"not a recognised image; send one of: {accepted}"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, 16/32-bit greyscale rescaled to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
