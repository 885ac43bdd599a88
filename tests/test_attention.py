"""What the model looks at (attention maps in the index, /attention) and why two banners are alike (/why, /pair)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from core.index import IndexInvalid, load_index
from devtools.cgroup import memory_of
from indexer.pack import pack_index

STORED_TOLERANCE = 1e-6  # answers round to 6 decimals


def error_of(r) -> dict:
    return r.get_json()["error"]


def _without_attention(index):
    """The copy of the session's index as a build from before attention maps left it."""
    manifest = json.loads((index / "manifest.json").read_text())
    for name, entry in manifest["strategies"].items():
        del entry["attention"]
        (index / name / "attention.npy").unlink()
    (index / "manifest.json").write_text(json.dumps(manifest))
    return index


def test_attention_answer_is_the_stored_map(client, built_index):
    r = client.get("/attention/20?strategy=simples16")
    assert r.status_code == 200 and r.headers["Cache-Control"].startswith("public")
    body = r.get_json()
    assert (body["appid"], body["strategy"], body["grid"]) == (20, "SimpleS16", [14, 14])
    stored = load_index(built_index.index).strategies["SimpleS16"].attention[1]  # apps are in appid order
    np.testing.assert_allclose(np.array(body["map"]), stored.astype(np.float64), atol=STORED_TOLERANCE, rtol=0)
    again = client.get("/attention/20?strategy=SimpleS16", headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and not again.data


def test_attention_picture_is_the_banner_as_the_model_sees_it(client, built_index):
    r = client.get("/attention/20.png?strategy=SimpleS16")
    assert r.status_code == 200 and r.mimetype == "image/png" and r.headers["ETag"]
    assert (
        client.get("/attention/20.png?strategy=SimpleS16", headers={"If-None-Match": r.headers["ETag"]}).status_code
        == 304
    )
    picture = np.asarray(Image.open(io.BytesIO(r.data)).convert("RGB"), np.float64)
    banner = np.asarray(Image.open(built_index.banners / "20.jpg").convert("RGB"), np.float64)
    assert picture.shape == banner.shape  # the size of the banner served
    # dino sees the middle square (resize 256, crop 224: rows 94 to 356 of 450): outside it, the banner dimmed
    outside, inside = np.s_[:90], np.s_[100:350]
    np.testing.assert_allclose(picture[outside], banner[outside] * 0.45, atol=2)
    assert np.abs(picture[inside] - banner[inside]).mean() > 10  # the heat map drawn over what it sees


def test_attention_errors(make_client, built_index, tmp_path):
    client = make_client()
    assert error_of(client.get("/attention/999"))["code"] == "unknown_appid"
    assert client.get("/attention/999.png").status_code == 404
    assert error_of(client.get("/attention/10?strategy=Nope"))["code"] == "unknown_strategy"
    banners = tmp_path / "banners"
    shutil.copytree(built_index.banners, banners)
    (banners / "20.jpg").unlink()
    client = make_client(banners_dir=banners)
    assert client.get("/attention/20").status_code == 200  # the map needs no banner; its picture does
    r = client.get("/attention/20.png")
    assert r.status_code == 404 and error_of(r)["code"] == "no_banner"
    assert error_of(client.get("/why/10/20"))["code"] == "no_banner"
    assert client.get("/pair/10/20").status_code == 404
    page = client.get("/render/10").get_data(as_text=True)  # no "why alike?" link to it; one to the others
    assert "/pair/10/20?" not in page
    assert page.count('class="why"') == page.count('class="card"') - ('href="/render/20?' in page)


def test_an_index_without_attention_maps_still_serves(make_client, index_copy):
    client = make_client(index_dir=_without_attention(index_copy))
    for url in ("/attention/10", "/attention/10.png"):
        r = client.get(url)
        assert r.status_code == 404 and error_of(r)["code"] == "attention_unavailable", url
        assert "build_index.py" in error_of(r)["message"]
    assert client.get("/match/10").status_code == 200
    assert client.get("/why/10/20?strategy=SimpleS16").status_code == 200  # computed, not stored
    page = client.get("/render/10?attention=1").get_data(as_text=True)
    assert "What the model looks at" not in page and "/attention/" not in page


def test_stored_maps_and_embeddings_are_read_without_mapping_their_files(make_client, index_copy):
    """Like the tables: a lookup's pages would otherwise stay mapped in every worker's RSS (core/table_rows.py)."""
    client = make_client(index_dir=index_copy)
    for appid in (10, 20, 30):
        assert client.get(f"/attention/{appid}?strategy=SimpleS16").status_code == 200
    assert client.get("/pair/10/10?strategy=SimpleS16").status_code == 200  # its score: the stored embeddings
    for name in ("attention.npy", "embeddings.npy"):
        assert memory_of(os.getpid(), index_copy / "SimpleS16" / name)["tables_rss"] == 0, name


def test_upload_answer_adds_its_attention_map_on_request(client, built_index):
    data = (built_index.banners / "30.jpg").read_bytes()
    plain = client.post("/match?strategy=SimpleS16&k=1", data=data, content_type="image/jpeg").get_json()
    assert "attention" not in plain
    body = client.post("/match?strategy=SimpleS16&k=1&attention=1", data=data, content_type="image/jpeg").get_json()
    assert body["attention"]["grid"] == [14, 14] and body["matches"] == plain["matches"]
    stored = load_index(built_index.index).strategies["SimpleS16"].attention[2]  # the same banner, as built
    np.testing.assert_allclose(np.array(body["attention"]["map"]), stored, atol=1e-5, rtol=1e-3)


def test_why_maps_each_patch_to_its_best_match_in_the_other_banner(client, built_index):
    first = client.get("/match/10?strategy=SimpleS16&k=1").get_json()["matches"][0]
    ab = client.get(f"/why/10/{first['appid']}?strategy=SimpleS16").get_json()
    assert (ab["score"], ab["score_from"]) == (first["score"], "table")
    assert ab["a"]["appid"] == 10 and ab["b"]["appid"] == first["appid"]
    a_map, b_map = np.array(ab["a"]["map"]), np.array(ab["b"]["map"])
    assert a_map.shape == b_map.shape == (14, 14) and ab["a"]["grid"] == [14, 14]
    assert a_map.min() >= -1 and a_map.max() <= 1 + 1e-6
    ba = client.get(f"/why/{first['appid']}/10?strategy=SimpleS16").get_json()
    np.testing.assert_allclose(ba["a"]["map"], b_map, atol=1e-5)  # the same pair, the other way round
    np.testing.assert_allclose(ba["b"]["map"], a_map, atol=1e-5)
    same = client.get("/why/10/10?strategy=SimpleS16").get_json()
    np.testing.assert_allclose(same["a"]["map"], 1.0, atol=1e-5)  # every patch finds itself
    emb = load_index(built_index.index).strategies["SimpleS16"].embeddings
    assert same["score_from"] == "embeddings"  # a game is not in its own table: the stored embeddings' cosine
    assert same["score"] == pytest.approx(float(emb[0].astype(np.float32) @ emb[0].astype(np.float32)), abs=1e-6)


def test_why_picture_shows_both_banners_and_answers_are_remembered(app, built_index):
    client, svc = app.test_client(), app.extensions["steam_dino"]
    passes = []
    run = svc.matcher.patch_matches
    svc.matcher.patch_matches = lambda *a: passes.append(a[0]) or run(*a)
    r = client.get("/why/10/40.png?strategy=SimpleS16")
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert Image.open(io.BytesIO(r.data)).size == (300 + 8 + 300, 450)
    assert client.get("/why/10/40?strategy=SimpleS16").status_code == 200
    assert client.get("/why/10/40.png", headers={"If-None-Match": r.headers["ETag"]}).status_code == 200  # ComplexB16
    etag = client.get("/why/10/40?strategy=SimpleS16").headers["ETag"]
    assert client.get("/why/10/40?strategy=SimpleS16", headers={"If-None-Match": etag}).status_code == 304
    assert passes == ["SimpleS16", "ComplexB16"]  # one model pass per pair and strategy


def test_why_without_weights_is_503(make_client, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    client = make_client(allow_weights_download=False)
    r = client.get("/why/10/20")
    assert r.status_code == 503 and error_of(r)["code"] == "weights_unavailable"
    assert str(tmp_path) not in r.get_data(as_text=True)
    assert client.get("/attention/10.png").status_code == 200  # stored maps need no model
    assert client.get("/pair/10/20").status_code == 200  # the page itself needs none either


def test_why_counts_against_the_upload_rate_limit(make_client, built_index):
    client = make_client(upload_rate_limit=(2, 3600.0))
    assert client.get("/why/10/20?strategy=SimpleS16").status_code == 200
    assert client.get("/why/10/20.png?strategy=SimpleS16").status_code == 200
    r = client.get("/why/10/30?strategy=SimpleS16")
    assert r.status_code == 429 and error_of(r)["code"] == "rate_limited"
    data = (built_index.banners / "30.jpg").read_bytes()
    assert client.post("/match?strategy=SimpleS16", data=data, content_type="image/jpeg").status_code == 429
    assert client.get("/attention/10.png").status_code == 200  # the stored maps are lookups: never charged
    assert client.get("/pair/10/30").status_code == 200


def test_gallery_view_of_what_the_model_looks_at_and_the_pair_page(client):
    page = client.get("/render/10?strategy=SimpleS16&k=4").get_data(as_text=True)
    assert "/attention/" not in page and 'href="/render/10?strategy=SimpleS16&amp;k=4&amp;attention=1"' in page
    assert page.count('class="why" href="/pair/10/') == 4
    looks = client.get("/render/10?strategy=SimpleS16&k=4&attention=1").get_data(as_text=True)
    assert looks.count('src="/attention/') == 5  # the query and its 4 matches
    assert "attention=1" in looks.split('id="matches"')[1]  # links to other galleries keep the view
    pair = client.get("/pair/10/20?strategy=SimpleS16")
    html = pair.get_data(as_text=True)
    assert pair.status_code == 200 and 'src="/why/10/20.png?strategy=SimpleS16"' in html
    assert "red parts are what the two share" in html and "<script" not in html


def test_attention_maps_are_packed_and_checked(built_index, tmp_path):
    packed = pack_index(built_index.index, tmp_path / "index.tar", ["SimpleS16"])
    with tarfile.open(packed.path) as tar:
        assert "SimpleS16/attention.npy" in tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert load_index(tmp_path / "unpacked").strategies["SimpleS16"].attention.shape == (24, 14, 14)
    maps = tmp_path / "unpacked" / "SimpleS16" / "attention.npy"
    np.save(maps, np.zeros((24, 14, 14), np.float16))  # same shape, other values
    with pytest.raises(IndexInvalid, match=r"attention\.npy: sha256 does not match"):
        load_index(tmp_path / "unpacked")
    np.save(maps, np.zeros((24, 14, 13), np.float16))
    with pytest.raises(IndexInvalid, match=r"attention\.npy: shape \(24, 14, 13\), expected \(24, 14, 14\)"):
        load_index(tmp_path / "unpacked", verify="quick")
