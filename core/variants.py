"""Mirror and flip queries: the image transformed before it is embedded. A variant is named by its transforms in a
fixed order joined by ``+`` ("mirror", "flip", "mirror+flip"), the name the index manifest and the API share."""

from __future__ import annotations

from itertools import combinations

from PIL import Image, ImageOps

TRANSFORMS = {"mirror": ImageOps.mirror, "flip": ImageOps.flip}  # in the order of a variant's name


class UnknownVariant(ValueError):
    """A transform name that is not one of TRANSFORMS."""


def variant_name(transforms: list[str] | tuple[str, ...] | set[str]) -> str:
    """The canonical name of a set of transforms ("" for none)."""
    unknown = set(transforms) - set(TRANSFORMS)
    if unknown:
        raise UnknownVariant(f"unknown transform(s) {sorted(unknown)}; known: {', '.join(TRANSFORMS)}")
    return "+".join(t for t in TRANSFORMS if t in transforms)


def parse_variants(raw: str) -> list[str]:
    """``--variants mirror,flip`` -> every variant those transforms make: ["mirror", "flip", "mirror+flip"]."""
    parts = [p.strip().lower() for p in raw.split(",") if p.strip()]
    chosen = variant_name(parts).split("+") if parts else []
    return [variant_name(c) for n in range(1, len(chosen) + 1) for c in combinations(chosen, n)]


def apply_variant(image: Image.Image, variant: str) -> Image.Image:
    """The image as the variant (a ``variant_name``) shows it (the same image for "")."""
    for t in filter(None, variant.split("+")):
        image = TRANSFORMS[t](image)
    return image
