"""Heat maps drawn over banners: where the model looks, and which parts of two banners match."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

DIM = 0.55  # how much of what the model does not see (outside its crop) is blacked out
STRENGTH = 0.7  # the heat map's opacity where it is strongest


def overlay(image: Image.Image, heat: np.ndarray, box: tuple[float, float, float, float]) -> Image.Image:
    """``image`` with a (h, w) map drawn over ``box`` (left, top, right, bottom): blue to red from its lowest to
    its highest value, more opaque where higher; what lies outside the box is dimmed."""
    heat = np.asarray(heat, np.float32)
    lo, span = float(heat.min()), float(np.ptp(heat))
    levels = Image.fromarray(np.uint8(np.rint((heat - lo) / (span or 1.0) * 255)), "L")
    left, top, right, bottom = (round(v) for v in box)
    levels = levels.resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    colours = ImageOps.colorize(levels, black="#2040ff", mid="#ffe000", white="#ff1000")
    out = Image.blend(image, Image.new("RGB", image.size), DIM)
    seen = image.crop((left, top, right, bottom))
    seen.paste(colours, mask=levels.point(lambda v: round(v * STRENGTH)))
    out.paste(seen, (left, top))
    return out


def side_by_side(a: Image.Image, b: Image.Image, gap: int = 8) -> Image.Image:
    """Two images in a row on a white background, top-aligned."""
    out = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height)), "white")
    out.paste(a, (0, 0))
    out.paste(b, (a.width + gap, 0))
    return out


def png_bytes(image: Image.Image) -> bytes:
    """A PNG, compressed fast (level 1): these are made per request."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
