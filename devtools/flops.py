"""FLOPs of a ViT forward pass, for the benchmarks' rates."""

from __future__ import annotations

from core.dino.backbones import ViTConfig


def count_flops(cfg: ViTConfig, height: int, width: int, cls_only_last_block: bool = False) -> int:
    """Multiply-adds x 2 of one image's forward pass (matmuls, attention, patch embedding); elementwise work
    (norms, GELU, softmax, residuals) is not counted."""
    p, d, m = cfg.patch_size, cfg.embed_dim, cfg.mlp_dim
    n = 1 + (height // p) * (width // p)
    patch = 2 * (n - 1) * (3 * p * p) * d
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    total = patch + cfg.depth * block
    if cls_only_last_block:
        last_cls = 2 * n * d * 2 * d + 2 * d * d + 2 * 2 * n * d + 2 * d * d + 2 * 2 * d * m
        total += last_cls - block
    return total
