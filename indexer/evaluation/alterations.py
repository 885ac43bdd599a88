"""The altered copies of a banner that copy detection searches for (as DINO's Copydays evaluation).

Each banner's random parameters come from its own ``random.Random`` (``query_rng``), drawn in a fixed
order: an evaluation is reproducible from its seed, and every strategy is measured on the same copies.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable

from PIL import Image, ImageEnhance, ImageOps

ALTERATIONS = ("crop", "jpeg", "resize", "flip", "jitter", "strong")  # in the order of the report
CROP_AREA = (0.5, 0.9)  # fraction of the area a crop keeps
CROP_ASPECT = (3 / 4, 4 / 3)  # change of the aspect ratio a crop may make (log-uniform)
JPEG_QUALITY = (20, 40)
JITTER = (0.6, 1.4)  # factor range of brightness, contrast and saturation


def random_crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """A crop keeping 50-90% of the area, anywhere, its aspect ratio changed by at most 4:3: a reframed banner,
    often without its edges (the title, the logo)."""
    w, h = img.size
    a = rng.uniform(*CROP_AREA)
    r = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    fw, fh = math.sqrt(a * r), math.sqrt(a / r)
    if fw > 1.0:  # keep the area when one side would exceed the image
        fw, fh = 1.0, a
    elif fh > 1.0:
        fw, fh = a, 1.0
    cw, ch = max(1, round(w * fw)), max(1, round(h * fh))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    """Recompressed as a JPEG of quality 20-40: the blocking and colour bleeding of re-uploads."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=rng.randint(*JPEG_QUALITY))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def downscale(img: Image.Image, rng: random.Random | None = None) -> Image.Image:
    """Half size and back (bicubic both ways): a thumbnail blown up again."""
    w, h = img.size
    small = img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def flip(img: Image.Image, rng: random.Random | None = None) -> Image.Image:
    """The mirror image (DINO trains with flips: its features should barely move)."""
    return ImageOps.mirror(img)


def colour_jitter(img: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a random factor in [0.6, 1.4]: a re-graded version."""
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhancer(img).enhance(rng.uniform(*JITTER))
    return img


def strong(img: Image.Image, rng: random.Random) -> Image.Image:
    """Crop, colour jitter, then JPEG: several edits at once, as Copydays' "strong" set."""
    return jpeg(colour_jitter(random_crop(img, rng), rng), rng)


_ALTER: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "crop": random_crop,
    "jpeg": jpeg,
    "resize": downscale,
    "flip": flip,
    "jitter": colour_jitter,
    "strong": strong,
}


def alterations(img: Image.Image, rng: random.Random) -> dict[str, Image.Image]:
    """Every alteration of ``img`` (as RGB), in ``ALTERATIONS`` order; the same rng state gives the same images."""
    img = img.convert("RGB")
    return {name: _ALTER[name](img, rng) for name in ALTERATIONS}


def query_rng(seed: int, appid: int) -> random.Random:
    """One banner's random source, from the seed and the appid only: a run with more queries extends one with
    fewer. (``random`` hashes string seeds with sha512, whatever PYTHONHASHSEED says.)"""
    return random.Random(f"evaluate/{seed}/{appid}")
