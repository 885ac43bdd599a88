"""The API's options through the test client: paging, batches, embeddings, mirror/flip on uploads,
HTTP caching (ETag, 304, Cache-Control, Vary, gzip), metrics, and the upload rate limit."""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.config import ConfigError, Settings
from app.params import EXTENSION_KEY


def tables(built_index, strategy):
    root = built_index.index / strategy
    return np.load(root / "neighbours.npy"), np.load(root / "scores.npy")


def appids(built_index):
    return [a["appid"] for a in json.loads((built_index.index / "apps.json").read_text())]


def test_offset_pages_through_the_table(client, built_index):
    nbr, sco = tables(built_index, "SimpleS16")
    ids = appids(built_index)
    body = client.get("/match/40?strategy=SimpleS16&k=3&offset=2").get_json()
    assert body["offset"] == 2 and body["k"] == 3
    assert [m["appid"] for m in body["matches"]] == [ids[i] for i in nbr[3, 2:5]]
    assert [m["rank"] for m in body["matches"]] == [3, 4, 5]
    np.testing.assert_allclose([m["score"] for m in body["matches"]], sco[3, 2:5], atol=1e-6)
    pages = [client.get(f"/match/40?strategy=SimpleS16&k=4&offset={o}").get_json()["matches"] for o in (0, 4, 8)]
    assert [m["appid"] for p in pages for m in p] == [ids[i] for i in nbr[3, :10]]  # the last page is short
    assert len(pages[2]) == 2
    assert client.get("/match/40?offset=10").status_code == 400  # past the table (width 10)
    assert client.get("/match/40?offset=-1").get_json()["error"]["parameter"] == "offset"
    unique = client.get("/unique?strategy=SimpleS16&n=3&offset=2").get_json()
    full = client.get("/unique?strategy=SimpleS16&n=5").get_json()
    assert unique["games"] == full["games"][2:5] and unique["offset"] == 2


def test_batch_lookup(make_client, built_index):
    client = make_client(max_batch=3)
    ids = appids(built_index)
    body = client.get(f"/match?appids={ids[0]},999999,{ids[5]}&k=2&strategy=SimpleS16").get_json()
    assert body["strategy"] == "SimpleS16" and len(body["results"]) == 3
    assert body["results"][0] == client.get(f"/match/{ids[0]}?k=2&strategy=SimpleS16").get_json()
    assert body["results"][1] == {
        "appid": 999999,
        "error": {"code": "unknown_appid", "message": "appid 999999 is not in the index"},
    }
    assert body["results"][2]["query"]["appid"] == ids[5]
    too_many = client.get("/match?appids=10,20,30,40")
    assert too_many.status_code == 400 and "at most 3" in too_many.get_json()["error"]["message"]
    assert client.get("/match?appids=10,x").get_json()["error"]["code"] == "bad_appid"
    assert client.get("/match").get_json()["error"]["parameter"] == "appids"


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_upload_embedding_and_mirror_flip(client, built_index):
    banner = Image.open(built_index.banners / "50.jpg").convert("RGB")
    plain = client.post("/match?strategy=SimpleS16&k=3&embedding=1", data=_png(banner), content_type="image/png")
    body = plain.get_json()
    vec = np.array(body["embedding"])
    assert vec.shape == (384,) and np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)
    stored = np.load(built_index.index / "SimpleS16" / "embeddings.npy")[appids(built_index).index(50)]
    assert float(vec @ stored.astype(np.float64)) == pytest.approx(1.0, abs=2e-3)
    assert "embedding" not in client.post("/match?strategy=SimpleS16", data=_png(banner), content_type="image/png").json
    # mirror=1 mirrors the upload before embedding: a mirrored banner, mirrored back, is the banner
    upside = _png(ImageOps.flip(ImageOps.mirror(banner)))
    both = client.post(
        "/match?strategy=SimpleS16&k=3&embedding=1&mirror=1&flip=true", data=upside, content_type="image/png"
    ).get_json()
    assert both["variant"] == "mirror+flip"
    np.testing.assert_allclose(both["embedding"], body["embedding"], atol=1e-5)
    assert [m["appid"] for m in both["matches"]] == [m["appid"] for m in body["matches"]]
    bad = client.post("/match?mirror=maybe", data=upside, content_type="image/png")
    assert bad.status_code == 400 and bad.get_json()["error"]["parameter"] == "mirror"
    long = client.get("/match/10?flip=" + "x" * 4000).get_json()["error"]  # echoed, but only its start
    assert long["parameter"] == "flip" and "'" + "x" * 40 + "'" in long["message"] and len(long["message"]) < 200


def test_mirror_lookup_without_tables_names_the_build_option(client):
    r = client.get("/match/10?mirror=1")
    err = r.get_json()["error"]
    assert r.status_code == 400 and err["code"] == "variant_unavailable"
    assert "--variants mirror,flip" in err["message"] and err["available"] == []
    assert client.get("/match?appids=10&flip=1").get_json()["error"]["code"] == "variant_unavailable"


@pytest.mark.parametrize(
    "url",
    [
        "/match/10?k=3",
        "/match?appids=10,20",
        "/compare/10?k=2",
        "/unique?n=3",
        "/apps?q=portal",
        "/apps/10",
        "/strategies",
    ],
)
def test_etag_and_cache_control_on_precomputed_answers(client, url):
    first = client.get(url)
    etag = first.headers["ETag"]
    assert first.status_code == 200 and first.headers["Cache-Control"] == "public, max-age=3600"
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag
    assert client.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    assert client.get(url, headers={"If-None-Match": f'"x", {etag}'}).status_code == 304


def test_a_compressed_answers_etag_gets_a_304_without_building_the_answer(client, monkeypatch):
    """flask-compress tags a gzipped answer "<tag>:gzip": sent back, it is answered from the tag alone."""
    zipped = client.get("/match/10?k=10", headers={"Accept-Encoding": "gzip"})
    assert zipped.headers["Content-Encoding"] == "gzip" and zipped.headers["ETag"].endswith(':gzip"')
    service = client.application.extensions[EXTENSION_KEY]
    monkeypatch.setattr(service, "table_payload", lambda *a, **kw: pytest.fail("the answer was built again"))
    again = client.get("/match/10?k=10", headers={"Accept-Encoding": "gzip", "If-None-Match": zipped.headers["ETag"]})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == zipped.headers["ETag"]


def test_etag_follows_the_parameters_and_the_index(make_client, client, built_index, tmp_path):
    tags = {client.get(u).headers["ETag"] for u in ("/match/10", "/match/10?k=3", "/match/20", "/match/10?offset=1")}
    assert len(tags) == 4
    assert client.get("/match/10").headers["ETag"] == client.get("/match/10?k=10&strategy=complexb16").headers["ETag"]
    # the answer never depends on the Host header (URLs are relative, or from PUBLIC_URL): neither does its ETag
    assert (
        client.get("/match/10", headers={"Host": "other.example"}).headers["ETag"]
        == client.get("/match/10").headers["ETag"]
    )
    assert make_client(cache_max_age=60).get("/match/10").headers["Cache-Control"] == "public, max-age=60"
    assert "ETag" not in client.get("/match/999999").headers  # errors are not cached


@pytest.mark.parametrize("url", ["/match/10?k=3", "/apps/10", "/match?appids=10"])
def test_etag_follows_the_banner_folder(make_client, tmp_path, url):
    """Same index, banners folder gone: banner_url switches from /banners/... to the store's URL, so a client
    revalidating with the old ETag must get the new answer, not a 304 that keeps the dead /banners/ links."""
    with_banners = make_client()
    first = with_banners.get(url)
    assert "/banners/10.jpg" in first.get_data(as_text=True)
    without = make_client(banners_dir=tmp_path / "empty")
    again = without.get(url, headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 200 and "/banners/10.jpg" not in again.get_data(as_text=True)


def test_etag_of_strategies_follows_the_default_strategy(make_client):
    a = make_client(default_strategy="ComplexB16").get("/strategies")
    b = make_client(default_strategy="SimpleS16")
    r = b.get("/strategies", headers={"If-None-Match": a.headers["ETag"]})
    assert r.status_code == 200 and r.get_json()["default"] == "SimpleS16"


def test_compare_varies_on_accept(client):
    as_json = client.get("/compare/10?k=2")
    as_html = client.get("/compare/10?k=2", headers={"Accept": "text/html"})
    assert as_json.mimetype == "application/json" and as_html.mimetype == "text/html"
    for r in (as_json, as_html):
        assert "Accept" in r.headers["Vary"]
    assert as_json.headers["ETag"] != as_html.headers["ETag"]


def test_gzip_over_one_kilobyte(client):
    plain = client.get("/match/10?k=10")
    zipped = client.get("/match/10?k=10", headers={"Accept-Encoding": "gzip"})
    assert len(plain.data) > 1024 and "Content-Encoding" not in plain.headers
    assert zipped.headers["Content-Encoding"] == "gzip" and "Accept-Encoding" in zipped.headers["Vary"]
    assert gzip.decompress(zipped.data) == plain.data and len(zipped.data) < len(plain.data) / 2
    small = client.get("/match/10?k=1", headers={"Accept-Encoding": "gzip"})
    assert len(small.data) < 1024 and "Content-Encoding" not in small.headers
    page = client.get("/?q=game", headers={"Accept-Encoding": "gzip"})
    assert page.headers["Content-Encoding"] == "gzip"


def test_metrics_count_requests_uploads_and_the_index(client, built_index):
    from app.params import EXTENSION_KEY

    client.get("/match/10")
    client.get("/match/999999")
    client.post("/match?strategy=SimpleS16", data=_png(Image.new("RGB", (60, 90), "red")), content_type="image/png")
    text = client.get("/metrics").get_data(as_text=True)
    assert 'http_request_duration_seconds_count{endpoint="/match/<appid>",method="GET",status="200"}' in text
    assert 'http_request_duration_seconds_count{endpoint="/match/<appid>",method="GET",status="404"}' in text
    for stage in ("decode", "preprocess", "forward", "search"):
        assert f'upload_stage_seconds_count{{stage="{stage}",strategy="SimpleS16"}}' in text
    assert 'model_loads_total{backbone="S16"}' in text
    assert "index_apps 24.0" in text
    build = client.application.extensions[EXTENSION_KEY].build_id
    assert f'index_build_info{{build_id="{build}"' in text
    health = client.get("/health").get_json()
    assert "S16" in health["models_loaded"] and health["index_build"] == build


def test_rate_limit_settings(make_client, built_index):
    with pytest.raises(ConfigError, match="RATE_LIMIT_STORAGE_URI"):
        Settings.from_env({"RATE_LIMIT_STORAGE_URI": "mongodb://x"})
    assert Settings.from_env({}).rate_limit_storage_uri == "memory://"
    client = make_client(upload_rate_limit=(1, 60.0))
    first = client.post("/upload", data={"image": (io.BytesIO(b"junk"), "a.jpg")})
    second = client.post("/match", data=b"junk", content_type="image/png")  # one budget for both ways in
    assert first.status_code == 400 and second.status_code == 429
    assert second.get_json()["error"]["code"] == "rate_limited" and int(second.headers["Retry-After"]) >= 1
