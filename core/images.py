"""Decoding images safely into RGB, for uploads and for the banner folder alike.

Everything that can go wrong with an untrusted file is turned into an
``ImageRejected`` with a stable code: not an image at all, a format we do not
accept, more pixels than allowed (checked from the header, before any pixel
is decoded, so decompression bombs cost nothing), or a corrupt/truncated
file. Any mode is converted to RGB the way a viewer would show it:
transparency composited on white, 16-bit greyscale scaled rather than
clipped, EXIF orientation applied.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_PIXELS = 40_000_000  # 40 megapixels: far above any banner, far below a bomb


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
) -> Image.Image:
    """Decode source (bytes, a path or a binary file) into a fully loaded RGB image."""
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
        with contextlib.suppress(Exception):  # malformed EXIF: keep the stored orientation, do not reject
            img = ImageOps.exif_transpose(img)
        return to_rgb(img)
    finally:
        if fp is not source:
            fp.close()


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
