"""Beyond the original eight: GeM, multi-scale, the full-banner preprocessing and DINOv2, built and served."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_generated_index

from app import create_app
from app.config import Settings
from core.dino.extract import Extractor
from core.dino.preprocess import PREPROCESSINGS
from core.dino.strategies import parse_strategies
from core.dino.weights import ModelCache
from core.images import open_image
from core.index import load_index

NAMES = "GemS16,MultiScaleS16,ComplexS16@full,SimpleS16@square,SimpleS14"


@pytest.fixture(scope="module")
def extended_index(tmp_path_factory, checkpoint_store):
    """8 banners, the extended strategies, built once for this module; TORCH_HOME is ``torch_home`` in it."""
    return build_generated_index(tmp_path_factory.mktemp("extended"), checkpoint_store, NAMES.split(","), n=8, k=5).root


@pytest.mark.slow
def test_extended_strategies_are_built_and_recorded(extended_index):
    index = load_index(extended_index / "index")
    assert list(index.strategies) == NAMES.split(",")
    dims = {name: s.embeddings.shape[1] for name, s in index.strategies.items()}
    assert dims == {
        "GemS16": 768,
        "MultiScaleS16": 384,
        "ComplexS16@full": 1536,
        "SimpleS16@square": 384,
        "SimpleS14": 384,
    }
    full = index.manifest["strategies"]["ComplexS16@full"]["preprocessing"]
    assert full["name"] == "full" and full["resize"] == [336, 224] and full["crop"] is None
    assert index.manifest["strategies"]["SimpleS14"]["checkpoint"]["file"] == "dinov2_vits14_pretrain.pth"
    assert index.manifest["strategies"]["MultiScaleS16"]["params"]["scales"][1] == pytest.approx(2**-0.5)


@pytest.mark.slow
def test_extended_features_equal_independent_computations(extended_index, monkeypatch):
    """Each stored row against a computation from the model's own intermediate outputs."""
    monkeypatch.setenv("TORCH_HOME", str(extended_index / "torch_home"))
    index = load_index(extended_index / "index")
    appid = index.apps[2]["appid"]
    img = open_image(extended_index / "banners" / f"{appid}.jpg")
    ex = Extractor(parse_strategies("SimpleS16,SimpleS14"), models=ModelCache())
    s16, s14 = ex.backbones["S16"].model, ex.backbones["S14"].model
    dino = PREPROCESSINGS["dino"].transform()(img)[None]
    full = PREPROCESSINGS["full"].transform()(img)[None]
    square = PREPROCESSINGS["square"].transform()(img)[None]
    with torch.inference_mode():
        (last,) = s16.get_intermediate_layers(dino, 1)
        patches = last[:, 1:].reshape(1, 14, 14, -1).clamp(min=1e-6).permute(0, 3, 1, 2)
        gem = F.avg_pool2d(patches.pow(4), (14, 14)).pow(0.25).reshape(1, -1)
        want = {"GemS16": torch.cat((last[:, 0], gem), 1)}
        ms = sum(
            s16(dino if s == 1 else F.interpolate(dino, scale_factor=s, mode="bilinear", align_corners=False))
            for s in (1, 2**-0.5, 0.5)
        )
        want["MultiScaleS16"] = ms / 3
        layers = s16.get_intermediate_layers(full, 4)
        assert layers[-1].shape[1] == 1 + 21 * 14  # the whole 2:3 banner: 14 x 21 patches
        want["ComplexS16@full"] = torch.cat([t[:, 0] for t in layers], -1)
        want["SimpleS16@square"] = s16(square)
        want["SimpleS14"] = s14(dino)
    for name, vec in want.items():
        stored = index.strategies[name].embeddings[2].astype(np.float32)
        np.testing.assert_allclose(stored, F.normalize(vec, dim=-1)[0].numpy(), atol=1e-3, err_msg=name)


@pytest.mark.slow
def test_extended_strategies_are_served(extended_index, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(extended_index / "torch_home"))
    client = create_app(
        Settings(index_dir=extended_index / "index", banners_dir=extended_index / "banners")
    ).test_client()
    assert client.get("/strategies").get_json()["default"] == "GemS16"  # ComplexB16 is not built here
    data = (extended_index / "banners" / "40.jpg").read_bytes()
    for name in NAMES.split(","):
        got = client.get(f"/match/40?strategy={name}&k=5")
        assert got.status_code == 200 and len(got.get_json()["matches"]) == 5
        up = client.post(f"/match?strategy={name}&k=2", data=data, content_type="image/jpeg")
        assert up.status_code == 200, up.data
        assert up.get_json()["matches"][0]["appid"] == 40, name
    compare = client.get("/compare/40?strategies=GemS16,SimpleS14&k=5").get_json()
    assert set(compare["matches"]) == {"GemS16", "SimpleS14"}
