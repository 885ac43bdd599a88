"""The model against outputs of the official DINO / DINOv2 code (tests/fixtures), to 1e-5."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from core.dino.backbones import BACKBONES
from core.dino.vit import VisionTransformer, ViTConfig
from devtools.flops import count_flops

DINO = FIXTURES / "dino"
DINOV2 = FIXTURES / "dinov2"
TOL = 1e-5


def _tiny_dino(patch: int) -> VisionTransformer:
    cfg = json.loads((DINO / "fixture.json").read_text())["config"]
    state = torch.load(DINO / f"tiny_p{patch}.pth", map_location="cpu", weights_only=True)
    side = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    model = VisionTransformer(
        ViTConfig(cfg["embed_dim"], cfg["depth"], cfg["num_heads"], patch, cfg["mlp_ratio"], pos_grid=side)
    )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _dino_cases():
    cases = json.loads((DINO / "fixture.json").read_text())["cases"]
    return [pytest.param(name, case, id=name) for name, case in cases.items()]


def _input(path) -> torch.Tensor:
    return torch.from_numpy(np.load(path).astype(np.float32))


@pytest.mark.parametrize(("name", "case"), _dino_cases())
def test_dino_matches_official_outputs(name, case):
    patch = int(name.split("_")[0][1:])
    model = _tiny_dino(patch)
    x = _input(DINO / case["input"])
    want_cls = np.load(DINO / case["forward_cls"])
    want_last4 = np.load(DINO / case["last4_normed_tokens"])
    with torch.inference_mode():
        got_cls = model(x).numpy()
        got_last4 = np.stack([t.numpy() for t in model.get_intermediate_layers(x, 4)])
        feats = model.forward_features(x, n_last_blocks=4, patch_tokens=True)
        feats_cls_only = model.forward_features(x, n_last_blocks=4, patch_tokens=False)
    assert got_cls.shape == want_cls.shape
    np.testing.assert_allclose(got_cls, want_cls, atol=TOL, rtol=0)
    assert got_last4.shape == want_last4.shape
    np.testing.assert_allclose(got_last4, want_last4, atol=TOL, rtol=0)
    # forward_features: [CLS] of the last 4 blocks (oldest first) and the last block's patch tokens
    np.testing.assert_allclose(feats.cls.numpy(), want_last4[:, :, 0].transpose(1, 0, 2), atol=TOL, rtol=0)
    np.testing.assert_allclose(feats.patch.numpy(), want_last4[-1][:, 1:], atol=TOL, rtol=0)
    np.testing.assert_allclose(feats_cls_only.cls.numpy(), feats.cls.numpy(), atol=TOL, rtol=0)
    assert feats_cls_only.patch is None
    h, w = x.shape[-2:]
    assert feats.grid == (h // patch, w // patch)


@pytest.mark.parametrize(("name", "case"), _dino_cases())
@pytest.mark.parametrize("patch_tokens", [True, False], ids=["all-tokens", "cls-only"])
def test_attention_map_matches_official_last_selfattention(name, case, patch_tokens):
    """[CLS]'s row of the official get_last_selfattention, averaged over heads, on the patch grid."""
    patch = int(name.split("_")[0][1:])
    x = _input(DINO / case["input"])
    want = np.load(DINO / case["last_selfattention_cls"])  # (batch, heads, tokens), token 0 = [CLS]
    with torch.inference_mode():
        got = _tiny_dino(patch).forward_features(x, 1, patch_tokens).attention
    h, w = x.shape[-2] // patch, x.shape[-1] // patch
    assert got.shape == (1, h, w) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), want[:, :, 1:].mean(axis=1).reshape(1, h, w), atol=TOL, rtol=0)


def test_fixture_covers_square_and_non_square_for_both_patch_sizes():
    names = [p.id for p in _dino_cases()]
    for patch in (16, 8):
        sizes = [n.split("_")[1].split("x") for n in names if n.startswith(f"p{patch}_")]
        assert any(h == w for h, w in sizes) and any(h != w for h, w in sizes)


def _tiny_dinov2() -> tuple[VisionTransformer, dict]:
    fx = json.loads((DINOV2 / "fixture.json").read_text())
    c = fx["config"]
    cfg = ViTConfig(
        c["embed_dim"],
        c["depth"],
        c["num_heads"],
        c["patch_size"],
        c["mlp_ratio"],
        pos_grid=c["img_size"] // c["patch_size"],
        layerscale=True,
        mask_token=True,
    )
    model = VisionTransformer(cfg)
    model.load_state_dict(torch.load(DINOV2 / "tiny_p14.pth", map_location="cpu", weights_only=True), strict=True)
    return model.eval(), fx


def test_dinov2_matches_official_outputs():
    model, fx = _tiny_dinov2()
    assert fx["config"]["interpolate_offset"] == 0.1 and not fx["config"]["interpolate_antialias"]
    for name, case in fx["cases"].items():
        x = _input(DINOV2 / case["input"])
        with torch.inference_mode():
            out = model.forward_features(x, n_last_blocks=1, patch_tokens=True)
            cls = model(x)
        want_cls = np.load(DINOV2 / case["x_norm_clstoken"])
        want_patch = np.load(DINOV2 / case["x_norm_patchtokens"])
        np.testing.assert_allclose(out.cls[:, -1].numpy(), want_cls, atol=TOL, rtol=0, err_msg=name)
        np.testing.assert_allclose(cls.numpy(), want_cls, atol=TOL, rtol=0, err_msg=name)
        np.testing.assert_allclose(out.patch.numpy(), want_patch, atol=TOL, rtol=0, err_msg=name)


@pytest.mark.parametrize(
    ("keys_file", "mapping"),
    [
        ("dino", {"vit_small/16": "S16", "vit_small/8": "S8", "vit_base/16": "B16", "vit_base/8": "B8"}),
        (
            "dinov2",
            {
                "dinov2_vits14_pretrain.pth": "S14",
                "dinov2_vitb14_pretrain.pth": "B14",
                "dinov2_vitl14_pretrain.pth": "L14",
            },
        ),
    ],
)
def test_state_dict_layout_matches_official_checkpoints(keys_file, mapping):
    official = json.loads((FIXTURES / keys_file / "official_checkpoint_keys.json").read_text())
    assert set(mapping) <= set(official)
    for name, code in mapping.items():
        with torch.device("meta"):  # shapes only: no memory, no initialisation (ViT-L/14 takes seconds)
            model = VisionTransformer(BACKBONES[code].config)
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == official[name], f"{name}: key names or shapes differ from the official checkpoint"


def test_checkpoint_files_are_the_official_ones():
    assert {c: b.checkpoint for c, b in BACKBONES.items()} == {
        "S16": "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
        "S8": "dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
        "B16": "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
        "B8": "dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
        "S14": "dinov2_vits14/dinov2_vits14_pretrain.pth",
        "B14": "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
        "L14": "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    }
    assert BACKBONES["B8"].filename == "dino_vitbase8_pretrain.pth"


def test_non_multiple_input_sizes_are_floored_like_the_official_code():
    """DINO's multi-scale eval feeds e.g. 158x158 inputs: the conv floors to 9x9 patches at p16."""
    model = _tiny_dino(16)
    x = torch.randn(2, 3, 158, 175)
    with torch.inference_mode():
        out = model.forward_features(x, 2, True)
        ref = model.get_intermediate_layers(x, 2)
    assert out.grid == (9, 10)
    assert out.patch.shape == (2, 90, 64)
    np.testing.assert_allclose(out.cls.numpy(), torch.stack([r[:, 0] for r in ref], 1).numpy(), atol=TOL)


def test_batched_forward_equals_one_by_one():
    model = _tiny_dino(8)
    x = torch.randn(5, 3, 112, 168)
    with torch.inference_mode():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(batched.numpy(), single.numpy(), atol=TOL)


def test_count_flops_vit_s16():
    cfg = BACKBONES["S16"].config
    # 12 blocks of (qkv + attention + proj + MLP) on 197 tokens, plus the patch embedding: ~9.2 GFLOPs
    assert 9.1e9 < count_flops(cfg, 224, 224) < 9.3e9
    assert count_flops(cfg, 224, 224, cls_only_last_block=True) < count_flops(cfg, 224, 224)
