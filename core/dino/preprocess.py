"""Image preprocessing modes, recorded by name and parameters in the index manifest.

- ``dino`` (default): Resize(256) of the shorter edge, bicubic, CenterCrop(224),
  as DINO's eval_knn.py / eval_linear.py. Sees the middle square of a banner.
- ``square``: resize to 224x224 ignoring the aspect ratio, as DINO's
  copy-detection eval. Sees the whole banner, squeezed.
- ``full``: the whole 2:3 banner at 224x336 (width x height, a multiple of the
  patch sizes 8, 14 and 16), no crop, no squeeze for 2:3 images; the position
  embeddings are interpolated to the 14x21 patch grid.

All three end with ToTensor and Normalize(ImageNet mean, std). The service
rebuilds the transform from the manifest's parameters (``from_manifest``), so
queries are embedded exactly as the index was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """A resize (shorter edge to ``resize``, or exactly ``resize`` as [height, width]), then an optional crop."""

    name: str
    resize: int | tuple[int, int]
    crop: tuple[int, int] | None  # (height, width) of a centre crop, or None
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the tensors this mode produces."""
        if self.crop is not None:
            return self.crop
        if isinstance(self.resize, int):
            raise ValueError(f"preprocessing {self.name!r} has no fixed output size")
        return self.resize

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after this mode's Resize, computed as torchvision does, from the header alone.

        Lets an image be refused before decoding when its resized form would be absurd: ``dino``
        scales the shorter edge to 256, so a 1 x N image would become 256 x 256N.
        """
        if not isinstance(self.resize, int):
            return self.resize[1], self.resize[0]
        short, long = sorted((max(1, width), max(1, height)))
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if width <= height else (new_long, self.resize)

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image to a normalised (3, H, W) float32 tensor."""
        mode = T.InterpolationMode(self.interpolation)
        size = self.resize if isinstance(self.resize, int) else list(self.resize)
        steps: list = [T.Resize(size, interpolation=mode)]
        if self.crop is not None:
            steps.append(T.CenterCrop(list(self.crop)))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def to_manifest(self) -> dict:
        d = asdict(self)
        d["resize"] = self.resize if isinstance(self.resize, int) else list(self.resize)
        d["crop"] = None if self.crop is None else list(self.crop)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_manifest(cls, d: dict) -> Preprocessing:
        """Rebuild a mode from its manifest entry, validating every field."""
        try:
            resize = d["resize"]
            resize = int(resize) if isinstance(resize, int) else (int(resize[0]), int(resize[1]))
            crop = None if d.get("crop") is None else (int(d["crop"][0]), int(d["crop"][1]))
            prep = cls(
                name=str(d["name"]),
                resize=resize,
                crop=crop,
                interpolation=str(d.get("interpolation", "bicubic")),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
            )
            T.InterpolationMode(prep.interpolation)
            prep.output_size  # noqa: B018 - validates that the size is fixed
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"invalid preprocessing entry {d!r}: {e}") from None
        if len(prep.mean) != 3 or len(prep.std) != 3:
            raise ValueError(f"invalid preprocessing entry {d!r}: mean and std need 3 values")
        return prep


PREPROCESSINGS: dict[str, Preprocessing] = {
    "dino": Preprocessing("dino", resize=256, crop=(224, 224)),
    "square": Preprocessing("square", resize=(224, 224), crop=None),
    "full": Preprocessing("full", resize=(336, 224), crop=None),
}
DEFAULT_PREPROCESSING = "dino"


def largest_resize(preps: Sequence[Preprocessing]) -> Callable[[int, int], tuple[int, int]]:
    """The resized (width, height) with the most pixels over several modes: what decoding must allow for.

    A partial of a module function, not a closure, so DataLoader workers can pickle it.
    """
    return functools.partial(_largest_resize, tuple(preps))


def _largest_resize(preps: tuple[Preprocessing, ...], width: int, height: int) -> tuple[int, int]:
    return max((p.resized_size(width, height) for p in preps), key=lambda wh: wh[0] * wh[1])


def get_preprocessing(name: str) -> Preprocessing:
    try:
        return PREPROCESSINGS[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing {name!r}; known: {', '.join(PREPROCESSINGS)}") from None
