"""The strategy registry: names, dims, manifest round trips, and the pooling formulas."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from core.dino.strategies import (
    DEFAULT_STRATEGY,
    ORIGINAL_STRATEGIES,
    STYLES,
    Strategy,
    UnknownStrategy,
    parse_strategies,
    parse_strategy,
)
from core.dino.vit import VisionTransformer, ViTConfig

EXPECTED = {
    "SimpleS16": (384, "S16"),
    "ComplexS16": (1536, "S16"),
    "SimpleS8": (384, "S8"),
    "ComplexS8": (1536, "S8"),
    "SimpleB16": (768, "B16"),
    "ComplexB16": (1536, "B16"),
    "SimpleB8": (768, "B8"),
    "ComplexB8": (1536, "B8"),
}


def test_the_eight_original_strategies():
    assert set(ORIGINAL_STRATEGIES) == set(EXPECTED)
    assert DEFAULT_STRATEGY == "ComplexB16"
    for name, (dim, code) in EXPECTED.items():
        s = parse_strategy(name)
        assert (s.name, s.dim, s.backbone.code, s.preprocessing.name) == (name, dim, code, "dino")
    assert parse_strategy("ComplexS16").params == {"n_last_blocks": 4, "avgpool_patchtokens": False}
    assert parse_strategy("ComplexB8").params == {"n_last_blocks": 1, "avgpool_patchtokens": True}


def test_extended_names():
    assert parse_strategy("GemB16").dim == 1536
    assert parse_strategy("MultiScaleS8").dim == 384
    assert parse_strategy("SimpleL14").backbone.label == "DINOv2 ViT-L/14"
    assert parse_strategy("ComplexB16@full").preprocessing.output_size == (336, 224)
    assert parse_strategy("SimpleS16@dino").name == "SimpleS16"  # canonical: the default mode is implicit


@pytest.mark.parametrize("bad", ["", "complexb16", "ComplexB32", "FancyB16", "ComplexX16", "SimpleS16@fisheye", "S16"])
def test_unknown_names_list_the_valid_ones(bad):
    with pytest.raises(UnknownStrategy) as e:
        parse_strategy(bad)
    msg = str(e.value)
    assert "ComplexB16" in msg and "Simple" in msg and "@" in msg


def test_parse_strategies_all_and_lists():
    assert [s.name for s in parse_strategies("all")] == list(ORIGINAL_STRATEGIES)
    assert [s.name for s in parse_strategies("SimpleS16, ComplexS16,SimpleS16")] == ["SimpleS16", "ComplexS16"]
    with pytest.raises(UnknownStrategy):
        parse_strategies(" , ")


def test_manifest_round_trip():
    for name in [*ORIGINAL_STRATEGIES, "GemS8", "MultiScaleB16@square", "SimpleB14@full"]:
        s = parse_strategy(name)
        entry = json.loads(json.dumps(s.to_manifest()))
        back = Strategy.from_manifest(name, entry)
        assert (back.name, back.dim, back.params, back.preprocessing) == (s.name, s.dim, s.params, s.preprocessing)


@pytest.mark.parametrize(
    "change",
    [
        {"style": "Fancy"},
        {"backbone": "X99"},
        {"dim": 7},
        {"params": {"n_last_blocks": "4", "avgpool_patchtokens": False}},
        {"params": {"n_last_blocks": 40, "avgpool_patchtokens": False}},
        {"params": {}},
    ],
)
def test_manifest_entries_are_validated(change):
    entry = parse_strategy("ComplexS16").to_manifest() | change
    with pytest.raises(ValueError, match="ComplexS16"):
        Strategy.from_manifest("ComplexS16", entry)


def _tiny(patch: int = 16) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(ViTConfig(64, 5, 4, patch)).eval()


def test_complex_equals_official_eval_linear_formula():
    """eval_linear.py: cat of [CLS] of the last n layers; with avgpool, interleaved with the patch mean."""
    model = _tiny()
    x = torch.randn(3, 3, 224, 224)
    with torch.inference_mode():
        for n, avgpool in ((4, False), (1, True), (2, False)):
            layers = model.get_intermediate_layers(x, n)
            want = torch.cat([t[:, 0] for t in layers], dim=-1)
            if avgpool:
                want = torch.cat((want.unsqueeze(-1), torch.mean(layers[-1][:, 1:], dim=1).unsqueeze(-1)), dim=-1)
                want = want.reshape(want.shape[0], -1)
            outputs = {1.0: model.forward_features(x, n, avgpool)}
            got = STYLES["Complex"].pool(outputs, {"n_last_blocks": n, "avgpool_patchtokens": avgpool})
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_simple_equals_forward():
    model = _tiny(8)
    x = torch.randn(2, 3, 112, 168)
    with torch.inference_mode():
        got = STYLES["Simple"].pool({1.0: model.forward_features(x, 1, False)}, {})
        torch.testing.assert_close(got, model(x), atol=1e-5, rtol=0)


def test_gem_equals_copy_detection_formula():
    model = _tiny()
    x = torch.randn(2, 3, 224, 336)
    with torch.inference_mode():
        feats = model.get_intermediate_layers(x, n=1)[0]
        cls = feats[:, 0, :]
        b, h, w, d = len(x), x.shape[-2] // 16, x.shape[-1] // 16, feats.shape[-1]
        patches = feats[:, 1:, :].reshape(b, h, w, d).clamp(min=1e-6).permute(0, 3, 1, 2)
        gem = F.avg_pool2d(patches.pow(4), (h, w)).pow(1.0 / 4).reshape(b, -1)
        want = torch.cat((cls, gem), dim=1)
        got = STYLES["Gem"].pool({1.0: model.forward_features(x, 1, True)}, {"gem_p": 4.0})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_multiscale_equals_dino_multi_scale():
    model = _tiny()
    x = torch.randn(2, 3, 224, 224)
    scales = [1.0, 1 / math.sqrt(2), 0.5]
    with torch.inference_mode():
        want = None
        for s in scales:  # utils.multi_scale, without its whole-batch norm (we normalise per row)
            inp = x.clone() if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            f = model(inp).clone()
            want = f if want is None else want + f
        want = want / 3
        outputs = {}
        for s in scales:
            xs = x if s == 1 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            outputs[s] = model.forward_features(xs, 1, False)
        got = STYLES["MultiScale"].pool(outputs, {"scales": scales})
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert parse_strategy("MultiScaleS16").needs.scales == tuple(sorted(scales, reverse=True))


def test_pool_normalises():
    s = parse_strategy("ComplexS16")
    model = _tiny()
    with torch.inference_mode():
        out = model.forward_features(torch.randn(2, 3, 224, 224), 4, False)
    f = s.pool({1.0: out})
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(2))
