"""Extraction: one code path for one image and for folders, four forwards for the eight strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_banner

from core.dino.extract import Extractor
from core.dino.preprocess import PREPROCESSINGS
from core.dino.strategies import ORIGINAL_STRATEGIES, parse_strategies
from core.dino.weights import ModelCache
from core.images import open_image


@pytest.fixture
def s16_b16(install_checkpoints):
    install_checkpoints("S16", "B16")


@pytest.mark.slow
def test_all_eight_strategies_dims_and_four_forwards(install_checkpoints, tmp_path, monkeypatch):
    install_checkpoints("S16", "S8", "B16", "B8")
    ex = Extractor(parse_strategies("all"), models=ModelCache())
    calls = []
    for loaded in ex.backbones.values():
        original = loaded.model.forward_features

        def counted(x, n, patch, _orig=original, _code=loaded.backbone.code):
            calls.append((_code, n, patch))
            return _orig(x, n, patch)

        monkeypatch.setattr(loaded.model, "forward_features", counted)
    img = open_image(make_banner(tmp_path / "a.jpg", seed=3))
    feats = ex.embed_images([img])
    dims = {"S": (384, 1536), "B": (768, 1536)}
    for name in ORIGINAL_STRATEGIES:
        simple, complex_ = dims[name[-3] if name[-2:] == "16" else name[-2]]
        want = simple if name.startswith("Simple") else complex_
        assert feats[name].shape == (1, want), name
        assert feats[name].dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(feats[name], axis=1), 1.0, atol=1e-5)
    assert sorted(calls) == [("B16", 1, True), ("B8", 1, True), ("S16", 4, False), ("S8", 4, False)]


def test_features_equal_official_formulas(s16_b16, tmp_path):
    img = open_image(make_banner(tmp_path / "a.jpg", seed=5))
    ex = Extractor(parse_strategies("SimpleS16,ComplexS16,ComplexB16"), models=ModelCache())
    feats = ex.embed_images([img])
    x = PREPROCESSINGS["dino"].transform()(img)[None]
    s16 = ex.backbones["S16"].model
    b16 = ex.backbones["B16"].model
    with torch.inference_mode():
        simple = F.normalize(s16(x), dim=-1)
        layers = s16.get_intermediate_layers(x, 4)
        complex_s = F.normalize(torch.cat([t[:, 0] for t in layers], -1), dim=-1)
        (last,) = b16.get_intermediate_layers(x, 1)
        cb = torch.cat((last[:, 0].unsqueeze(-1), last[:, 1:].mean(1).unsqueeze(-1)), -1).reshape(1, -1)
        complex_b = F.normalize(cb, dim=-1)
    np.testing.assert_allclose(feats["SimpleS16"], simple.numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["ComplexS16"], complex_s.numpy(), atol=1e-5)
    np.testing.assert_allclose(feats["ComplexB16"], complex_b.numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 1])
def test_folder_batches_equal_single_images(s16_b16, tmp_path, num_workers):
    paths = [make_banner(tmp_path / f"{i}.jpg", seed=i) for i in range(7)]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(paths[0].read_bytes()[:2000])
    files = [*paths[:3], tmp_path / "bad.jpg", *paths[3:], truncated, tmp_path / "missing.jpg"]
    ex = Extractor(parse_strategies("SimpleS16,ComplexS16,SimpleS16@full"), models=ModelCache())
    rows, failures = {}, {}
    for batch in ex.iter_files(files, batch_size=3, num_workers=num_workers):
        for j, i in enumerate(batch.indices):
            rows[i] = {k: v[j] for k, v in batch.features.items()}
        failures.update(dict(batch.failures))
    assert sorted(failures) == [3, 8, 9]
    assert failures[3].startswith(("not_an_image", "corrupt_image"))
    assert failures[8].startswith("corrupt_image")
    assert failures[9].startswith("unreadable")
    assert sorted(rows) == [0, 1, 2, 4, 5, 6, 7]
    for i, path in enumerate(files):
        if i in rows:
            single = ex.embed_images([open_image(path)])
            for name, vec in single.items():
                np.testing.assert_allclose(rows[i][name], vec[0], atol=1e-5, err_msg=f"{name} {path.name}")


def test_precision_options_are_validated(s16_b16):
    s = parse_strategies("SimpleS16")
    with pytest.raises(ValueError, match="only supported on CUDA"):
        Extractor(s, device="cpu", precision="bf16")
    with pytest.raises(ValueError, match="precision must be"):
        Extractor(s, device="cpu", precision="int4")
    with pytest.raises(ValueError, match="no strategy"):
        Extractor([], device="cpu")


def test_models_are_shared_between_extractors(s16_b16):
    cache = ModelCache()
    a = Extractor(parse_strategies("SimpleS16"), models=cache)
    b = Extractor(parse_strategies("ComplexS16,GemS16"), models=cache)
    assert a.backbones["S16"].model is b.backbones["S16"].model
    assert len(cache.loaded()) == 1
