"""Mirror/flip variants: names, exact variant tables, the builder's --variants option, the loader's checks, lookups."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest
from conftest import build_generated_index
from PIL import Image

from core.index import IndexInvalid, load_index
from core.knn_device import topk_table_device
from core.variants import UnknownVariant, apply_variant, parse_variants, variant_name


def test_names_and_transforms():
    assert parse_variants("mirror,flip") == ["mirror", "flip", "mirror+flip"]
    assert parse_variants("flip, mirror") == ["mirror", "flip", "mirror+flip"]
    assert parse_variants("flip") == ["flip"] and parse_variants("") == []
    assert variant_name({"flip", "mirror"}) == "mirror+flip" and variant_name([]) == ""
    with pytest.raises(UnknownVariant):
        parse_variants("mirror,rotate")
    img = Image.new("RGB", (2, 3))
    img.putpixel((0, 0), (255, 0, 0))
    assert apply_variant(img, "mirror").getpixel((1, 0)) == (255, 0, 0)
    assert apply_variant(img, "flip").getpixel((0, 2)) == (255, 0, 0)
    assert apply_variant(img, "mirror+flip").getpixel((1, 2)) == (255, 0, 0)
    assert apply_variant(img, "") is img


def test_variant_tables_are_a_float64_brute_force():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 16)).astype(np.float16)
    table = (table / np.linalg.norm(table.astype(np.float64), axis=1, keepdims=True)).astype(np.float16)
    queries = np.concatenate([table[:10], table[:40]]).astype(np.float16)  # exact ties with the rows themselves
    queries[10:] = (rng.normal(size=(40, 16))).astype(np.float16)
    nbr, sco = topk_table_device(table, 7, "cpu", queries=queries, chunk_rows=8)
    dots = queries.astype(np.float64) @ table.astype(np.float64).T
    for i in range(len(queries)):
        dots[i, i] = -np.inf
        order = np.lexsort((np.arange(50), -dots[i]))[:7]
        assert nbr[i].tolist() == order.tolist()
        np.testing.assert_array_equal(sco[i], dots[i, order].astype(np.float32))
    assert nbr.dtype == np.int32 and sco.dtype == np.float32 and (nbr != np.arange(50)[:, None]).all()


@pytest.fixture(scope="module")
def variant_index(tmp_path_factory, checkpoint_store):
    """8 banners, SimpleS16, k=4, built with --variants mirror,flip through the command line's code."""
    root = tmp_path_factory.mktemp("variants")
    return build_generated_index(
        root, checkpoint_store, ["SimpleS16"], n=8, k=4, variants=parse_variants("mirror,flip")
    ).root


@pytest.mark.slow
def test_build_with_variants_and_look_them_up(variant_index, monkeypatch):
    from core.dino.extract import Extractor
    from core.dino.strategies import parse_strategies
    from core.dino.weights import ModelCache
    from core.images import open_image

    manifest = json.loads((variant_index / "index" / "manifest.json").read_text())
    assert manifest["variants"] == ["mirror", "flip", "mirror+flip"]
    assert set(manifest["strategies"]["SimpleS16"]["variants"]) == {"mirror", "flip", "mirror+flip"}
    index = load_index(variant_index / "index")
    s = index.strategies["SimpleS16"]
    cached = [p.stem for p in (variant_index / ".index.work" / "store").glob("*.npz")]
    assert len(cached) == 5 and sum(k.endswith("-attention") for k in cached) == 1  # attention: plain banners only
    monkeypatch.setenv("TORCH_HOME", str(variant_index / "torch_home"))
    ex = Extractor(parse_strategies("SimpleS16"), models=ModelCache())
    images = [open_image(variant_index / "banners" / f"{a['appid']}.jpg") for a in index.apps]
    flipped = ex.embed_images([apply_variant(im, "mirror+flip") for im in images])["SimpleS16"]
    np.testing.assert_allclose(s.variants["mirror+flip"].embeddings, flipped.astype(np.float16), atol=2e-3)
    nbr, sco = topk_table_device(s.embeddings, 4, "cpu", queries=s.variants["mirror+flip"].embeddings)
    np.testing.assert_array_equal(s.variants["mirror+flip"].neighbours, nbr)
    np.testing.assert_array_equal(s.variants["mirror+flip"].scores, sco)

    from app import create_app
    from app.config import Settings

    client = create_app(Settings(index_dir=variant_index / "index", banners_dir=variant_index / "banners"))
    client = client.test_client()
    body = client.get("/match/20?mirror=1&flip=1&k=3").get_json()
    assert body["variant"] == "mirror+flip" and body["strategy"] == "SimpleS16"
    assert [m["appid"] for m in body["matches"]] == [index.apps[i]["appid"] for i in nbr[1, :3]]
    plain = client.get("/match/20?k=3")
    mirrored = client.get("/match/20?k=3&mirror=1")
    assert plain.headers["ETag"] != mirrored.headers["ETag"]
    assert client.get("/strategies").get_json()["strategies"][0]["variants"] == ["flip", "mirror", "mirror+flip"]
    batch = client.get("/match?appids=20,30&flip=1&k=2").get_json()
    assert [r["variant"] for r in batch["results"]] == ["flip", "flip"]


@pytest.mark.slow
def test_loader_checks_variant_files(variant_index, tmp_path):
    bad = tmp_path / "index"
    shutil.copytree(variant_index / "index", bad)
    path = bad / "SimpleS16" / "variants" / "flip" / "scores.npy"
    arr = np.load(path)
    arr[0, 0] = 5.0
    np.save(path, arr)
    with pytest.raises(IndexInvalid, match="sha256"):
        load_index(bad)
    load_index(bad, verify="quick")  # shapes only: still loads
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["strategies"]["SimpleS16"]["variants"]["rotate"] = manifest["strategies"]["SimpleS16"]["variants"]["flip"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexInvalid, match="unknown variant 'rotate'"):
        load_index(bad, verify="quick")
    (bad / "SimpleS16" / "variants" / "mirror" / "neighbours.npy").unlink()
    del manifest["strategies"]["SimpleS16"]["variants"]["rotate"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexInvalid, match="missing"):
        load_index(bad, verify="quick")


@pytest.mark.slow
def test_pack_keeps_the_variant_tables(variant_index, tmp_path):
    from indexer.pack import pack_index

    packed = pack_index(variant_index / "index", tmp_path / "index.tar")
    with tarfile.open(packed.path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    unpacked = load_index(tmp_path / "x")
    assert sorted(unpacked.strategies["SimpleS16"].variants) == ["flip", "mirror", "mirror+flip"]
