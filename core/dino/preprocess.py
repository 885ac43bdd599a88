"""Image preprocessing modes, recorded by name and parameters in the index manifest.

- ``dino`` (default): Resize(256) of the shorter edge, bicubic, CenterCrop(224),
  as DINO's eval_knn.py / eval_linear.py. Sees the middle square of a banner.
- ``square``: resize to 224x224 ignoring the aspect ratio, as DINO's
  copy-detection eval. Sees the whole banner, squeezed.
- ``full``: the whole 2:3 banner at 224x336 (width x height, a multiple of the
  patch sizes 8, 14 and 16), no crop, no squeeze for 2:3 images; the position
  embeddings are interpolated to the 14x21 patch grid.

All three end with ToTensor and Normalize(ImageNet mean, std). The service rebuilds the mode from the manifest
(``from_manifest``), so queries are embedded exactly as the index was.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where tensors are made, not to read a manifest
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's InterpolationMode values -> Pillow filter, for PIL images
_PIL_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "nearest-exact": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
INTERPOLATIONS = tuple(_PIL_RESAMPLE)


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

    def pil_resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``resized_size`` in Pillow's order, (width, height): for ``core.images.open_image(resize_to=)``, which
        refuses an image whose resized form would be absurd (a 1 x N image, 256 x 256N in ``dino``) undecoded."""
        h, w = self.resized_size(max(1, height), max(1, width))
        return w, h

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL RGB image to a normalised (3, H, W) float32 tensor, as DINO's torchvision transforms compute it (the
        same Pillow calls and torch ops: bit for bit), without importing torchvision, whose import pulls in torch's
        compiler stack before a process's first upload. A bound method, so that DataLoader workers can pickle it."""
        return self._transform_pil

    def _transform_pil(self, img: Image.Image) -> torch.Tensor:
        import torch

        height, width = self.resized_size(img.height, img.width)
        if (img.height, img.width) != (height, width):  # Resize: Pillow's resize, as for PIL images
            img = img.resize((width, height), _PIL_RESAMPLE[self.interpolation])
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))
        return self._crop_to_tensor(x.view(img.height, img.width, len(img.getbands())).permute((2, 0, 1)).contiguous())

    @property
    def supports_tensor_input(self) -> bool:
        """Whether ``tensor_transform`` reproduces this mode (antialiased bilinear and bicubic do)."""
        return self.interpolation in ("bicubic", "bilinear")

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize, computed as torchvision's Resize does for PIL images."""
        if not isinstance(self.resize, int):
            return self.resize
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)
        return (new_long, self.resize) if width <= height else (self.resize, new_long)

    def seen_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom): the part of a width x height image that the model sees, in its pixels."""
        h, w = self.resized_size(height, width)
        crop_h, crop_w = self.crop or (h, w)
        top, left = _crop_box(h, w, (crop_h, crop_w))
        return left * width / w, top * height / h, (left + crop_w) * width / w, (top + crop_h) * height / h

    def tensor_transform(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 images, on any device, to normalised (B, 3, h, w) float32 tensors: ``transform``'s
        steps on tensors (see ``resize_like_pillow``)."""
        import torch

        if not self.supports_tensor_input:
            raise ValueError(f"preprocessing {self.name!r}: {self.interpolation} resizing has no tensor equivalent")
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected a (B, 3, H, W) uint8 batch, got {images.dtype} {tuple(images.shape)}")
        x = images.float()
        x = resize_like_pillow(x, self.resized_size(x.shape[-2], x.shape[-1]), self.interpolation)
        return self._crop_to_tensor(x)

    def _crop_to_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """CenterCrop, then ToTensor's scaling to [0, 1] and Normalize, on resized (..., 3, H, W) 8-bit values:
        a crop copies values, so cropping after the conversion gives what cropping the image gives."""
        import torch

        if self.crop is not None:
            x = _center_crop_tensor(x, self.crop)
        return _normalize(x.to(dtype=torch.get_default_dtype()).div_(255), self.mean, self.std)

    def to_manifest(self) -> dict:
        """The mode's fields (tuples become JSON lists)."""
        return asdict(self)

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
            if prep.interpolation not in INTERPOLATIONS:
                raise ValueError(f"interpolation {prep.interpolation!r} is not one of {INTERPOLATIONS}")
            prep.output_size  # noqa: B018 - validates that the size is fixed
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"invalid preprocessing entry {d!r}: {e}") from None
        if len(prep.mean) != 3 or len(prep.std) != 3:
            raise ValueError(f"invalid preprocessing entry {d!r}: mean and std need 3 values")
        return prep


def resize_like_pillow(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (B, C, H, W) float tensors holding 8-bit values as Pillow resizes an 8-bit image: two separable
    passes with the antialiased kernel of ``interpolate(antialias=True)``, rounded to 8 bits after each. Which
    pass comes first depends on the sizes and the Pillow version, so it is asked of the installed Pillow once per
    size (``_vertical_first``); Pillow's fixed-point coefficients still leave rare one-level differences."""
    height, width = x.shape[-2:]
    passes = [(height, size[1]), size]
    if _vertical_first(height, width, size[0], size[1], mode):
        passes = [(size[0], width), size]
    for step in passes:
        if tuple(step) != tuple(x.shape[-2:]):
            x = _pil_pass(x, step, mode)
    return x


@functools.lru_cache(maxsize=256)
def _vertical_first(height: int, width: int, out_h: int, out_w: int, mode: str) -> bool:
    """Does the installed Pillow resample this resize vertically first? Measured on a random image."""
    if height == out_h or width == out_w:
        return False  # one pass only
    import torch

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
    want = torch.from_numpy(np.array(img.resize((out_w, out_h), _PIL_RESAMPLE[mode]))).permute(2, 0, 1).float()
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    h_first = _pil_pass(_pil_pass(x, (height, out_w), mode), (out_h, out_w), mode)[0]
    v_first = _pil_pass(_pil_pass(x, (out_h, width), mode), (out_h, out_w), mode)[0]
    return bool((v_first != want).sum() < (h_first != want).sum())


def _pil_pass(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One antialiased resampling pass, rounded half up and clipped to 8 bits as Pillow does."""
    import torch.nn.functional as F

    x = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return x.add_(0.5).floor_().clamp_(0.0, 255.0)


def _crop_box(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of a centre crop, rounded as torchvision rounds it."""
    return round((height - crop[0]) / 2.0), round((width - crop[1]) / 2.0)


def _padding(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) zeros that a crop larger than the image needs first, as torchvision pads."""
    ch, cw = crop
    return (
        (cw - width) // 2 if cw > width else 0,
        (ch - height) // 2 if ch > height else 0,
        (cw - width + 1) // 2 if cw > width else 0,
        (ch - height + 1) // 2 if ch > height else 0,
    )


def _center_crop_tensor(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    import torch.nn.functional as F

    left, top, right, bottom = _padding(x.shape[-2], x.shape[-1], crop)
    if left or top or right or bottom:
        x = F.pad(x, (left, right, top, bottom), value=0.0)
    top, left = _crop_box(x.shape[-2], x.shape[-1], crop)
    return x[..., top : top + crop[0], left : left + crop[1]]


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """In place, as torchvision's Normalize: the mean and std as tensors of ``x``'s dtype, subtract, divide."""
    import torch

    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return x.sub_(m).div_(s)


PREPROCESSINGS: dict[str, Preprocessing] = {
    "dino": Preprocessing("dino", resize=256, crop=(224, 224)),
    "square": Preprocessing("square", resize=(224, 224), crop=None),
    "full": Preprocessing("full", resize=(336, 224), crop=None),
}
DEFAULT_PREPROCESSING = "dino"


def largest_resize(preps: Sequence[Preprocessing]) -> Callable[[int, int], tuple[int, int]]:
    """The resized (width, height) with the most pixels over several modes: what decoding must allow for.
    A partial of a module function, not a closure, so DataLoader workers can pickle it."""
    return functools.partial(_largest_resize, tuple(preps))


def _largest_resize(preps: tuple[Preprocessing, ...], width: int, height: int) -> tuple[int, int]:
    return max((p.pil_resized_size(width, height) for p in preps), key=lambda wh: wh[0] * wh[1])


def get_preprocessing(name: str) -> Preprocessing:
    try:
        return PREPROCESSINGS[name]
    except KeyError:
        raise ValueError(f"unknown preprocessing {name!r}; known: {', '.join(PREPROCESSINGS)}") from None
