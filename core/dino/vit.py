"""The vision transformer of DINO and DINOv2, in the official checkpoint layout.

Parameter names match the official state dicts (checkpoints load with ``strict=True``) and the numerics match
the official code (LayerNorm eps 1e-6, exact GELU, bicubic position-embedding interpolation with the +0.1
offset). Attention uses ``scaled_dot_product_attention``, the fastest kernel on the device. ``forward_features``
returns only what the pooling strategies read, in one pass; when the last block's patch tokens are not needed,
that block runs for the [CLS] query alone (its keys and values still see every token). The same pass yields the
last block's [CLS] attention map.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import ViTConfig

LAYERNORM_EPS = 1e-6


@dataclass
class BackboneOutput:
    """What one forward pass yields for the pooling strategies.

    cls: (B, n, D) the final-normed [CLS] token after each of the last n blocks,
         oldest first, so ``cls[:, -1]`` is DINO's ``forward()`` output.
    patch: (B, h*w, D) the final-normed patch tokens of the last block, or None.
    grid: (h, w) the patch grid of the input.
    attention: (B, h, w) float32, the last block's [CLS] attention to each patch, averaged over the heads.
    """

    cls: torch.Tensor
    patch: torch.Tensor | None
    grid: tuple[int, int]
    attention: torch.Tensor


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided convolution, as the official code."""

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: torch.Tensor, cls_only: bool = False) -> tuple[torch.Tensor, ...]:
        """q, k, v as (B, heads, tokens, head dim); with ``cls_only`` the query of [CLS] alone."""
        B, N, C = x.shape
        H = self.num_heads
        if not cls_only:
            return self.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :1], w[:C], b[:C]).reshape(B, 1, H, C // H).transpose(1, 2)
        kv = F.linear(x, w[C:], b[C:]).reshape(B, N, 2, H, C // H).permute(2, 0, 3, 1, 4)
        return q, kv[0], kv[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, n, d = q.shape
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, H * d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(*self.heads(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """DINOv2's per-channel residual scale (parameter name ``gamma``, as the checkpoints)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim) if cfg.layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        self.mlp = Mlp(dim, cfg.mlp_dim)
        self.ls2 = LayerScale(dim) if cfg.layerscale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_last(self, x: torch.Tensor, cls_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output (for [CLS] alone with ``cls_only``), and [CLS]'s softmax attention to the patch
        tokens averaged over the heads, (B, N - 1): row 0 of the official ``get_last_selfattention``."""
        q, k, v = self.attn.heads(self.norm1(x), cls_only)
        scores = (q[:, :, :1] @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        cls_attention = scores.float().softmax(dim=-1)[:, :, 0, 1:].mean(dim=1)
        x = (x[:, :1] if cls_only else x) + self.ls1(self.attn.attend(q, k, v))
        return x + self.ls2(self.mlp(self.norm2(x))), cls_attention


class VisionTransformer(nn.Module):
    """DINO / DINOv2 ViT backbone without a head (the official checkpoints have none)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.pos_grid**2, dim))
        if cfg.mask_token:
            self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(dim, eps=LAYERNORM_EPS)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def interpolate_pos_encoding(self, npatch: int, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an input of height x width pixels, as the official code: the grid is resized
        bicubically by a scale factor of (n + 0.1) / M, not to an output size (the factor sets the positions)."""
        pos = self.pos_embed
        M = pos.shape[1] - 1
        if npatch == M and height == width:
            return pos
        side = int(math.sqrt(M))
        dim = pos.shape[-1]
        h0 = height // self.cfg.patch_size
        w0 = width // self.cfg.patch_size
        grid = pos[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid,
            scale_factor=((h0 + 0.1) / side, (w0 + 0.1) / side),
            mode="bicubic",
            align_corners=False,
        )
        if grid.shape[-2:] != (h0, w0):
            raise RuntimeError(f"position grid {tuple(grid.shape[-2:])} != patch grid {(h0, w0)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim).to(pos.dtype)
        return torch.cat((pos[:, :1], grid), dim=1)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        B, _, height, width = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(B, -1, -1), tokens), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens.shape[1] - 1, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The final normed [CLS] token, shape (B, D): DINO's ``forward()``."""
        return self.forward_features(x, n_last_blocks=1, patch_tokens=False).cls[:, -1]

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """The last n blocks' outputs (all tokens), each through the final norm, as DINO."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                out.append(self.norm(x))
        return out

    def forward_features(self, x: torch.Tensor, n_last_blocks: int = 1, patch_tokens: bool = False) -> BackboneOutput:
        """One pass that yields everything the pooling strategies read (see BackboneOutput)."""
        depth = len(self.blocks)
        if not 1 <= n_last_blocks <= depth:
            raise ValueError(f"n_last_blocks must be in 1..{depth}, got {n_last_blocks}")
        grid = (x.shape[-2] // self.cfg.patch_size, x.shape[-1] // self.cfg.patch_size)
        x = self.prepare_tokens(x)
        cls = []
        for i, blk in enumerate(self.blocks[:-1]):
            x = blk(x)
            if depth - 1 - i < n_last_blocks:
                cls.append(self.norm(x[:, 0]))
        x, attention = self.blocks[-1].forward_last(x, cls_only=not patch_tokens)
        x = self.norm(x)
        cls.append(x[:, 0])
        patch = x[:, 1:] if patch_tokens else None
        return BackboneOutput(torch.stack(cls, dim=1), patch, grid, attention.reshape(-1, *grid))
