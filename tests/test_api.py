"""The Flask app through its test client: every endpoint, every parameter error, the pages."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from conftest import sha256_of, store_banner
from hostile_images import encode
from PIL import Image

from app import create_app
from app.config import Settings
from app.matching import Matcher
from core.dino.strategies import parse_strategies
from core.index import APPS, IndexWriter, make_manifest, write_strategy
from core.steam import ASSETS_URL
from devtools.synthetic import random_unit_vectors


def tables(built_index, strategy):
    root = built_index.index / strategy
    return np.load(root / "neighbours.npy"), np.load(root / "scores.npy")


def apps_of(built_index):
    return json.loads((built_index.index / "apps.json").read_text())


def error_of(resp):
    assert resp.is_json, resp.data[:200]
    return resp.get_json()["error"]


@pytest.mark.slow
def test_match_appid_equals_tables(client, built_index):
    apps = apps_of(built_index)
    for strategy in built_index.strategies:
        nbr, sco = tables(built_index, strategy)
        for row in (0, 5, 23):
            r = client.get(f"/match/{apps[row]['appid']}?strategy={strategy}&k=7")
            assert r.status_code == 200
            body = r.get_json()
            assert body["strategy"] == strategy and body["k"] == 7
            assert body["query"]["appid"] == apps[row]["appid"] and body["query"]["name"] == apps[row]["name"]
            assert [m["appid"] for m in body["matches"]] == [apps[i]["appid"] for i in nbr[row, :7]]
            assert [m["rank"] for m in body["matches"]] == list(range(1, 8))
            np.testing.assert_allclose([m["score"] for m in body["matches"]], sco[row, :7], atol=1e-6)
            m = body["matches"][0]
            assert m["store_url"] == f"https://store.steampowered.com/app/{m['appid']}/"
            assert m["banner_url"] == f"/banners/{m['appid']}.jpg"  # relative: no PUBLIC_URL, never the Host
    default = client.get(f"/match/{apps[0]['appid']}").get_json()
    assert default["strategy"] == "ComplexB16" and default["k"] == 10
    assert client.get(f"/match/{apps[0]['appid']}?strategy=complexs16").get_json()["strategy"] == "ComplexS16"


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("/match/abc", 400, "bad_appid"),
        ("/match/-5", 400, "bad_appid"),
        ("/match/12345678901", 400, "bad_appid"),
        ("/match/999999", 404, "unknown_appid"),
        ("/match/10?k=0", 400, "bad_parameter"),
        ("/match/10?k=11", 400, "bad_parameter"),
        ("/match/10?k=ten", 400, "bad_parameter"),
        ("/match/10?k=1.5", 400, "bad_parameter"),
        ("/match/10?strategy=FancyB16", 400, "unknown_strategy"),
        ("/match/10?strategy=SimpleB8", 400, "unknown_strategy"),
        ("/apps", 400, "bad_parameter"),
        ("/apps?q=", 400, "bad_parameter"),
        ("/apps?q=portal&limit=0", 400, "bad_parameter"),
        ("/apps?q=portal&limit=1000", 400, "bad_parameter"),
        ("/apps/xyz", 400, "bad_appid"),
        ("/apps/4", 404, "unknown_appid"),
        ("/unique?n=0", 400, "bad_parameter"),
        ("/unique?n=x", 400, "bad_parameter"),
        ("/unique?strategy=nope", 400, "unknown_strategy"),
        ("/nothing-here", 404, "not_found"),
        ("/compare/10?strategies=SimpleS16,Nope", 400, "unknown_strategy"),
    ],
)
def test_parameter_errors_are_json(client, url, status, code):
    r = client.get(url)
    assert r.status_code == status
    err = error_of(r)
    assert err["code"] == code and err["message"]


def test_unknown_strategy_lists_the_available_ones(client, built_index):
    err = error_of(client.get("/match/10?strategy=SimpleB8"))
    assert err["available"] == built_index.strategies
    assert all(s in err["message"] for s in built_index.strategies)


def test_method_not_allowed_is_json(client):
    r = client.delete("/match/10")
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


def _jpeg(path) -> bytes:
    return path.read_bytes()


@pytest.mark.slow
def test_upload_of_an_indexed_banner_finds_itself(client, built_index):
    apps = apps_of(built_index)
    appid = apps[4]["appid"]
    data = _jpeg(built_index.banners / f"{appid}.jpg")
    for strategy in built_index.strategies:
        r = client.post(f"/match?strategy={strategy}&k=5", data={"image": (io.BytesIO(data), "b.jpg")})
        assert r.status_code == 200, r.data
        body = r.get_json()
        assert body["matches"][0]["appid"] == appid
        assert body["matches"][0]["score"] == pytest.approx(1.0, abs=2e-3)
        assert body["query"]["width"] == 300 and body["query"]["height"] == 450
        assert len(body["query"]["sha256"]) == 64 and body["k"] == 5
        assert "forward;dur=" in r.headers["Server-Timing"]
    raw = client.post("/match?k=3", data=data, content_type="image/jpeg")
    assert raw.status_code == 200 and raw.get_json()["matches"][0]["appid"] == appid


def test_upload_search_is_exact(client, built_index):
    """An upload's matches equal a float64 brute force over the stored embeddings."""
    from core.dino.extract import Extractor
    from core.dino.strategies import parse_strategies
    from core.dino.weights import ModelCache
    from core.images import open_image

    img_bytes = io.BytesIO()
    Image.new("RGB", (300, 450), (30, 140, 200)).save(img_bytes, format="PNG")
    r = client.post("/match?strategy=ComplexS16&k=10", data=img_bytes.getvalue(), content_type="image/png")
    body = r.get_json()
    vec = Extractor(parse_strategies("ComplexS16"), models=ModelCache()).embed_images(
        [open_image(img_bytes.getvalue())]
    )["ComplexS16"][0]
    emb = np.load(built_index.index / "ComplexS16" / "embeddings.npy").astype(np.float64)
    scores = emb @ vec.astype(np.float64)
    order = np.lexsort((np.arange(len(scores)), -scores))[:10]
    apps = apps_of(built_index)
    assert [m["appid"] for m in body["matches"]] == [apps[i]["appid"] for i in order]
    np.testing.assert_allclose([m["score"] for m in body["matches"]], scores[order], atol=1e-5)


def _truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((300, 450), 60).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()[: buf.tell() // 2]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": {"file": (io.BytesIO(b"x"), "a.jpg")}}, 400, "missing_image"),
        ({"data": {"image": (io.BytesIO(b""), "a.jpg")}}, 400, "empty_upload"),
        ({"data": b"", "content_type": "image/jpeg"}, 400, "empty_upload"),
        ({"data": b"hello", "content_type": "text/plain"}, 415, "unsupported_media_type"),
        ({"data": b"{}", "content_type": "application/json"}, 400, "bad_url"),
        ({"data": b"abc"}, 415, "unsupported_media_type"),
        ({"data": b"<svg/>", "content_type": "image/svg+xml"}, 415, "unsupported_media_type"),
        ({"data": {"image": (io.BytesIO(b"<html></html>"), "a.jpg")}}, 400, "not_an_image"),
        ({"data": b"GIF89a garbage", "content_type": "image/gif"}, 400, "not_an_image"),
        ({"data": _truncated_jpeg(), "content_type": "image/jpeg"}, 400, "corrupt_image"),
    ],
)
def test_bad_uploads(client, kwargs, status, code):
    r = client.post("/match", **kwargs)
    assert r.status_code == status, r.data
    assert error_of(r)["code"] == code


def test_too_large_upload_is_413(make_client):
    client = make_client(max_upload_mb=0.05)
    r = client.post("/match", data=b"\xff\xd8" + b"\0" * 60_000, content_type="image/jpeg")
    assert r.status_code == 413 and error_of(r)["code"] == "too_large"
    assert "0.05 MB" in error_of(r)["message"]


def test_upload_without_weights_is_503_and_lookups_still_work(make_client, built_index, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    client = make_client(allow_weights_download=False)
    data = _jpeg(built_index.banners / "10.jpg")
    r = client.post("/match", data=data, content_type="image/jpeg")
    assert r.status_code == 503
    err = error_of(r)
    assert err["code"] == "weights_unavailable" and "dino_vitbase16_pretrain.pth" in err["message"]
    assert str(tmp_path) not in r.get_data(as_text=True)  # no server paths in bodies (the log has them)
    assert client.get("/match/10").status_code == 200
    assert client.post("/match", data=data, content_type="image/jpeg").status_code == 503  # remembered, fast


@pytest.mark.slow
def test_upload_with_other_weights_is_refused(make_client, built_index, monkeypatch, install_checkpoints):
    install_checkpoints("B16", seed=1)  # random weights other than the index's
    client = make_client()
    r = client.post("/match", data=_jpeg(built_index.banners / "10.jpg"), content_type="image/jpeg")
    assert r.status_code == 503 and "index was built with" in error_of(r)["message"]


def test_strategies_apps_unique_health(client, built_index):
    s = client.get("/strategies").get_json()
    assert s["default"] == "ComplexB16"
    assert [x["name"] for x in s["strategies"]] == built_index.strategies
    cs = next(x for x in s["strategies"] if x["name"] == "ComplexS16")
    assert cs["dim"] == 1536 and cs["k"] == 10 and cs["backbone"] == "DINO ViT-S/16"
    assert cs["checkpoint"] == "dino_deitsmall16_pretrain.pth"

    info = client.get("/apps/10").get_json()
    assert info["name"] == "Pokémon Quest" and info["strategies"] == built_index.strategies

    names = [g["name"] for g in client.get("/apps?q=pokemon").get_json()["results"]]
    assert names == ["Pokémon Quest"]
    names = [g["name"] for g in client.get("/apps?q=PORTAL").get_json()["results"]]
    assert names[:2] == ["Portal", "Portal 2"]
    names = [g["name"] for g in client.get("/apps?q=star wars").get_json()["results"]]
    assert names == ["STAR WARS™ Battlefront"]
    assert [g["name"] for g in client.get("/apps?q=cafe").get_json()["results"]] == ["Café Racer"]
    assert client.get("/apps?q=30").get_json()["results"][0]["appid"] == 30
    assert len(client.get("/apps?q=game&limit=3").get_json()["results"]) == 3

    nbr, sco = tables(built_index, "SimpleS16")
    u = client.get("/unique?strategy=SimpleS16&n=5").get_json()
    apps = apps_of(built_index)
    want = np.argsort(sco[:, 0], kind="stable")[:5]
    assert [g["appid"] for g in u["games"]] == [apps[i]["appid"] for i in want]
    assert u["games"][0]["best_match"]["appid"] == apps[nbr[want[0], 0]]["appid"]

    h = client.get("/health").get_json()
    assert h["status"] == "ok" and h["apps"] == 24 and h["strategies"] == built_index.strategies


def test_compare_json(client, built_index):
    body = client.get("/compare/10?strategies=SimpleS16,ComplexB16&k=5").get_json()
    assert body["strategies"] == ["SimpleS16", "ComplexB16"] and body["k"] == 5
    a = {m["appid"] for m in body["matches"]["SimpleS16"]}
    b = {m["appid"] for m in body["matches"]["ComplexB16"]}
    assert body["overlap"]["SimpleS16"]["ComplexB16"] == pytest.approx(len(a & b) / 5)
    assert body["overlap"]["SimpleS16"]["SimpleS16"] == 1.0
    assert set(body["in_all"]) == a & b
    full = client.get("/compare/10").get_json()
    assert full["strategies"] == built_index.strategies


def test_compare_default_k_is_capped_to_the_tables(make_client):
    """/match's default k is min(10, table width); /compare's default must be capped the same way, or its answer
    claims k=10 while every strategy returns at most the table width (and k=10 asked explicitly is a 400)."""
    client = make_client(max_k=5)
    body = client.get("/compare/10").get_json()
    assert all(len(m) == 5 for m in body["matches"].values())
    assert body["k"] == 5
    assert client.get("/match/10").get_json()["k"] == 5  # the same rule as lookups


def test_compare_of_an_unknown_appid_is_a_404_even_if_none_match_is_star(client):
    r = client.get("/compare/999999", headers={"If-None-Match": "*"})
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "unknown_appid"


def test_pages(client, built_index):
    home = client.get("/?q=portal")
    assert home.status_code == 200 and home.mimetype == "text/html"
    assert "Portal 2" in home.get_data(as_text=True) and 'name="image"' in home.get_data(as_text=True)
    assert "script-src 'none'" in home.headers["Content-Security-Policy"]
    assert home.headers["X-Frame-Options"] == "DENY" and home.headers["X-Content-Type-Options"] == "nosniff"

    page = client.get("/render/40?strategy=SimpleS16&k=6")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and "Portal 2" in html  # appid 40 is the fourth generated banner
    nbr, _ = tables(built_index, "SimpleS16")
    apps = apps_of(built_index)
    for i in nbr[3, :6]:
        assert f"/render/{apps[i]['appid']}?strategy=SimpleS16" in html
    assert html.count('class="card"') == 6
    assert "/render/40?strategy=ComplexB16" in html  # the strategy switcher

    bad = client.get("/render/999999")
    assert bad.status_code == 404 and bad.mimetype == "text/html" and "not in the index" in bad.get_data(as_text=True)

    up = client.post(
        "/upload",
        data={"image": (io.BytesIO(_jpeg(built_index.banners / "20.jpg")), "x.jpg"), "strategy": "ComplexS16"},
    )
    text = up.get_data(as_text=True)
    assert up.status_code == 200 and "data:image/jpeg;base64," in text and "Your image" in text
    assert text.index("/render/20?") < text.index("/render/", text.index('id="matches"') + 1) + 200

    cmp = client.get("/compare/10?k=4", headers={"Accept": "text/html"})
    assert cmp.status_code == 200 and cmp.mimetype == "text/html"
    assert cmp.get_data(as_text=True).count("compare-row") == 3

    banner = client.get("/banners/10.jpg")
    assert banner.status_code == 200 and banner.mimetype == "image/jpeg"
    assert banner.data == (built_index.banners / "10.jpg").read_bytes()
    assert client.get("/banners/11.jpg").status_code == 404
    assert client.get("/banners/..%2Fapps.json").status_code == 404


def test_banner_urls_are_ours_else_the_stores(make_client, built_index, tmp_path):
    """Our copy when the banner folder has it; else the store's URL (under its content hash, with its ?t= token);
    the plain path only for a game the store gave none."""
    (tmp_path / "some").mkdir()
    shutil.copy(built_index.banners / "40.jpg", tmp_path / "some")
    client = make_client(banners_dir=tmp_path / "some")
    hashed = f"{ASSETS_URL}steam/apps/10/{10:040x}/library_600x900.jpg?t=1700000010"
    expected = {
        10: hashed,
        20: f"{ASSETS_URL}steam/apps/20/library_600x900.jpg?t=1700000020",
        30: f"{ASSETS_URL}steam/apps/30/library_600x900.jpg",  # the store gave none
        40: "/banners/40.jpg",  # the store's path is hashed, but we serve the file
    }
    assert {a: client.get(f"/apps/{a}").get_json()["banner_url"] for a in expected} == expected
    assert client.get("/banners/40.jpg").status_code == 200 and client.get("/banners/10.jpg").status_code == 404
    for m in client.get("/match/10?k=10").get_json()["matches"]:
        local = m["appid"] == 40
        assert m["banner_url"] == "/banners/40.jpg" if local else m["banner_url"].startswith(ASSETS_URL)
        assert local or (store_banner(m["appid"]) or "library_600x900.jpg") in m["banner_url"]
    page = client.get("/render/10?k=3", headers={"Accept": "text/html"})
    assert f'src="{hashed}"' in page.get_data(as_text=True)
    assert "https://shared.steamstatic.com" in page.headers["Content-Security-Policy"]
    mirror = make_client(banners_dir=tmp_path / "none", assets_url="https://mirror.example/assets/")
    assert mirror.get("/apps/10").get_json()["banner_url"] == hashed.replace(
        ASSETS_URL, "https://mirror.example/assets/"
    )


def test_an_index_without_banner_paths_loads_with_plain_ones(make_client, index_copy, tmp_path):
    """apps.json of an index built from a list without the store's paths (or before them): the plain paths."""
    index = index_copy
    apps = [{"appid": a["appid"], "name": a["name"]} for a in json.loads((index / "apps.json").read_text())]
    (index / "apps.json").write_text(json.dumps(apps))
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["apps_sha256"] = sha256_of(index / "apps.json")
    (index / "manifest.json").write_text(json.dumps(manifest))
    client = make_client(index_dir=index, banners_dir=tmp_path / "none")
    m = client.get("/match/10?k=3").get_json()
    for game in [m["query"], *m["matches"]]:
        assert game["banner_url"] == f"{ASSETS_URL}steam/apps/{game['appid']}/library_600x900.jpg"


def test_cors(make_client):
    closed = make_client()
    assert "Access-Control-Allow-Origin" not in closed.get("/health", headers={"Origin": "https://x.example"}).headers
    client = make_client(cors_origins=["https://front.example"])
    ok = client.get("/health", headers={"Origin": "https://front.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://front.example"
    assert "Origin" in ok.headers["Vary"]
    other = client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    pre = client.options("/match", headers={"Origin": "https://front.example", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and "POST" in pre.headers["Access-Control-Allow-Methods"]


def test_upload_rate_limit(make_client, built_index):
    client = make_client(upload_rate_limit=(2, 60.0))
    data = _jpeg(built_index.banners / "10.jpg")
    codes = [
        client.post("/match?strategy=SimpleS16", data=data, content_type="image/jpeg").status_code for _ in range(3)
    ]
    assert codes == [200, 200, 429]
    r = client.post("/match?strategy=SimpleS16", data=data, content_type="image/jpeg")
    assert error_of(r)["code"] == "rate_limited" and int(r.headers["Retry-After"]) >= 1
    assert client.get("/match/10").status_code == 200  # lookups are not limited


def test_upload_rate_limit_counts_an_ipv6_client_by_its_64(make_client):
    """An IPv6 client holds a whole /64 and may send each request from another address of it."""
    client = make_client(upload_rate_limit=(2, 60.0))

    def post(peer: str) -> int:
        return client.post("/match?strategy=nope", data=b"x", environ_base={"REMOTE_ADDR": peer}).status_code

    assert [post(f"2001:db8:1:2::{i:x}") for i in range(1, 5)] == [400, 400, 429, 429]
    assert post("2001:db8:1:3::1") == 400 and post("192.0.2.1") == 400  # other clients


def test_an_index_without_neighbours_answers_no_matches(tmp_path, monkeypatch):
    """Tables of k = 0, which the index format allows: lookups and uploads answer no matches, /unique every game."""
    s, n = parse_strategies("SimpleS16")[0], 3
    emb = random_unit_vectors(n, s.dim, 0, "float16")
    with IndexWriter(tmp_path / "index") as writer:
        sha = writer.write_json(APPS, [{"appid": 10 * (i + 1), "name": f"Game {i}"} for i in range(n)])
        empty = np.empty((n, 0), np.int32), np.empty((n, 0), np.float32)
        entry = write_strategy(writer, s, emb, *empty, {"file": s.backbone.filename, "sha256": "0" * 64})
        writer.commit(make_manifest(n, sha, "float16", {s.name: entry}))
    heat = np.zeros(s.grid, np.float32)
    monkeypatch.setattr(Matcher, "embed", lambda self, name, image: (emb[1].astype(np.float32), heat, {}))
    client = create_app(Settings(index_dir=tmp_path / "index", banners_dir=tmp_path / "none")).test_client()
    assert client.get("/match/10").get_json()["matches"] == []
    assert [g["appid"] for g in client.get("/unique").get_json()["games"]] == [10, 20, 30]
    upload = client.post("/match", data=encode(Image.new("RGB", (300, 450), "red"), "JPEG"), content_type="image/jpeg")
    assert upload.status_code == 200 and upload.get_json()["matches"] == []
