"""The pretrained backbones we can load: shape, checkpoint file and where it is published.

A backbone is named by its short code, the part of a strategy name after the style: ``S16`` is DINO ViT-S/16,
``B8`` DINO ViT-B/8, ``S14`` DINOv2 ViT-S/14. Adding a backbone is one entry in ``BACKBONES``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

# Where DINO's and DINOv2's own hubconf.py download from, and the variables that override it (mirrors, tests).
DEFAULT_BASE_URL = {"dino": "https://dl.fbaipublicfiles.com/dino", "dinov2": "https://dl.fbaipublicfiles.com/dinov2"}
BASE_URL_ENV = {"dino": "DINO_BASE_URL", "dinov2": "DINOV2_BASE_URL"}


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a backbone: enough to build it and to count its FLOPs."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    pos_grid: int = 14  # the position embeddings cover pos_grid x pos_grid patches
    layerscale: bool = False  # DINOv2: ls1.gamma / ls2.gamma after attention and MLP
    mask_token: bool = False  # DINOv2 checkpoints carry an (unused here) mask token

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


ARCHES = {
    # arch code: (embed_dim, depth, num_heads, name)
    "S": (384, 12, 6, "ViT-S"),
    "B": (768, 12, 12, "ViT-B"),
    "L": (1024, 24, 16, "ViT-L"),
}


@dataclass(frozen=True)
class Backbone:
    code: str  # "S16", "B8", "S14"...
    family: str  # "dino" or "dinov2"
    arch: str  # "S", "B" or "L"
    config: ViTConfig
    checkpoint: str  # path of the file under the family's base URL

    @property
    def filename(self) -> str:
        """The checkpoint's file name, as it lies in ``$TORCH_HOME/hub/checkpoints/``."""
        return PurePosixPath(self.checkpoint).name

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def label(self) -> str:
        family = "DINO" if self.family == "dino" else "DINOv2"
        return f"{family} {ARCHES[self.arch][3]}/{self.patch_size}"


def _dino(arch: str, patch: int, stem: str) -> Backbone:
    dim, depth, heads, _ = ARCHES[arch]
    cfg = ViTConfig(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, pos_grid=224 // patch)
    return Backbone(f"{arch}{patch}", "dino", arch, cfg, f"{stem}/{stem}.pth")


def _dinov2(arch: str) -> Backbone:
    dim, depth, heads, _ = ARCHES[arch]
    cfg = ViTConfig(
        embed_dim=dim, depth=depth, num_heads=heads, patch_size=14, pos_grid=37, layerscale=True, mask_token=True
    )
    stem = f"dinov2_vit{arch.lower()}14"
    return Backbone(f"{arch}14", "dinov2", arch, cfg, f"{stem}/{stem}_pretrain.pth")


BACKBONES: dict[str, Backbone] = {
    b.code: b
    for b in (
        _dino("S", 16, "dino_deitsmall16_pretrain"),
        _dino("S", 8, "dino_deitsmall8_pretrain"),
        _dino("B", 16, "dino_vitbase16_pretrain"),
        _dino("B", 8, "dino_vitbase8_pretrain"),
        _dinov2("S"),
        _dinov2("B"),
        _dinov2("L"),
    )
}


def get_backbone(code: str) -> Backbone:
    try:
        return BACKBONES[code]
    except KeyError:
        raise ValueError(f"unknown backbone {code!r}; known: {', '.join(BACKBONES)}") from None
