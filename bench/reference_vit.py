"""The eager-attention reference formulation: DINO's official ViT, as the baseline of bench/extract.py.

Same modules and parameter names as ``core.dino.vit.VisionTransformer`` (so it loads the same state
dict with ``strict=True``), but attention written out as in the official ``vision_transformer.py``::

    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)

and features computed as the official eval scripts do, from ``get_intermediate_layers`` (every block
run for every token, the last one included), one image at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.dino.vit import Attention, VisionTransformer, ViTConfig


class ReferenceAttention(Attention):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__(dim, num_heads)
        self.scale = (dim // num_heads) ** -0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ReferenceViT(VisionTransformer):
    """The official formulation; ``get_intermediate_layers`` is inherited (it is the official loop)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__(cfg)
        for blk in self.blocks:
            blk.attn = ReferenceAttention(cfg.embed_dim, cfg.num_heads)


def reference_model(cfg: ViTConfig, state_dict: dict) -> ReferenceViT:
    model = ReferenceViT(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def reference_features(model: ReferenceViT, x: torch.Tensor, n_last_blocks: int, avgpool: bool) -> dict:
    """Simple (eval_knn: the final normed [CLS]) and Complex (eval_linear) features, L2-normalised,
    from one ``get_intermediate_layers`` call, written as the official eval_linear.py."""
    intermediate_output = model.get_intermediate_layers(x, n_last_blocks)
    output = torch.cat([t[:, 0] for t in intermediate_output], dim=-1)
    if avgpool:
        output = torch.cat(
            (output.unsqueeze(-1), torch.mean(intermediate_output[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1
        )
        output = output.reshape(output.shape[0], -1)
    simple = intermediate_output[-1][:, 0]
    return {"Simple": F.normalize(simple, dim=-1), "Complex": F.normalize(output, dim=-1)}
