"""Hostile input, unit level: tiny images that would cost gigabytes, JPEG scan bombs, the CDN fallback's
cache, single flight, deadline and rate limit, headers and URLs, and settings and index files that
must stop start-up with one clear line. The same reproductions against gunicorn: test_limits_service.py.
"""

from __future__ import annotations

import http.server
import io
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from conftest import start_http_server
from hostile_images import EMPTY_SCAN, scan_bomb
from PIL import Image

from app import StartupError
from app.config import ConfigError, Settings
from app.params import EXTENSION_KEY
from app.problems import NotFound, UpstreamFailed
from core.dino.preprocess import PREPROCESSINGS, largest_resize
from core.images import MAX_ASPECT_RATIO, ImageRejected, check_jpeg_scans, open_image
from core.index import IndexInvalid, load_index
from devtools.fake_steam import FakeGame, FakeSteam, bare_items_answer

DINO = PREPROCESSINGS["dino"].pil_resized_size


# -- generators of hostile images (shared with test_limits_service.py) ---------------------------------


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), 90).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims a size but carries one row: enough for a header check, tiny to build."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (3 * min(width, 4096) + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def webp(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def jpeg(width: int, height: int, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(
        buf, format="JPEG", quality=80, progressive=progressive
    )
    return buf.getvalue()


# -- images: refused from the header, before decoding --------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (png(1, 2000), "extreme_aspect_ratio"),
        (png(2000, 1), "extreme_aspect_ratio"),
        (png(1, 40_000), "extreme_aspect_ratio"),
        (webp(16383, 2), "extreme_aspect_ratio"),
        (png_header(1, 1_000_000), "extreme_aspect_ratio"),
        (png_header(1_000_000, 1), "extreme_aspect_ratio"),
        (png_header(1, 40_000_000), "extreme_aspect_ratio"),
    ],
    ids=["1x2000", "2000x1", "1x40000", "webp-16383x2", "1x1000000", "1000000x1", "1x40000000"],
)
def test_extreme_aspect_ratios_are_refused_naming_the_limit(data, code):
    with pytest.raises(ImageRejected) as e:
        open_image(data, resize_to=DINO)
    assert e.value.code == code and f"the limit is {MAX_ASPECT_RATIO}:1" in e.value.message


def test_resized_size_is_bounded_for_the_mode_in_use():
    assert DINO(1, 2000) == (256, 512_000)  # why the pixel cap alone is not enough
    assert DINO(600, 900) == (256, 384) and DINO(900, 600) == (384, 256)
    assert PREPROCESSINGS["full"].pil_resized_size(1, 20) == (224, 336)
    assert largest_resize(list(PREPROCESSINGS.values()))(600, 900) == (256, 384)
    big = PREPROCESSINGS["dino"].__class__("big", resize=1024, crop=None)
    with pytest.raises(ImageRejected) as e:  # 1024 x 15360: within the aspect cap, not within the size cap
        open_image(png(100, 1500), resize_to=big.pil_resized_size)
    assert e.value.code == "too_large_after_resize" and "2,000,000" in e.value.message
    assert open_image(png(100, 1500), resize_to=DINO).size == (100, 1500)  # 256 x 3840 is fine


def test_jpeg_scan_bomb_is_refused_before_decoding():
    bomb = scan_bomb(side=2000, scans=10_000)
    with pytest.raises(ImageRejected) as e:
        open_image(bomb)
    assert e.value.code == "too_much_decoding_work" and "scans" in e.value.message
    normal = jpeg(300, 450, progressive=True)
    assert 2 <= check_jpeg_scans(normal, 300 * 450) <= 12  # an ordinary progressive file passes, counted right
    assert open_image(normal).size == (300, 450)
    few = normal[:-2] + EMPTY_SCAN * 5 + normal[-2:]  # a few extra scans: within the budget
    assert open_image(few).size == (300, 450)


def test_a_huge_jpeg_is_decoded_at_a_reduced_scale_and_banners_are_not():
    big = jpeg(4000, 3000)
    assert open_image(big).size == (4000, 3000)
    reduced = open_image(big, resize_to=DINO)
    assert reduced.size == (1000, 750) and reduced.info["source_size"] == (4000, 3000)  # 1/4: >= 2x 341x256
    rgba = io.BytesIO()
    Image.new("RGBA", (3000, 2000), (0, 0, 255, 0)).save(rgba, format="PNG")
    out = open_image(rgba.getvalue(), resize_to=DINO)  # reduced before compositing on white
    assert out.size == (1000, 667) and out.getpixel((5, 5)) == (255, 255, 255)
    banner = jpeg(600, 900)
    assert open_image(banner, resize_to=DINO).size == (600, 900)  # as the index saw it


# -- the CDN fallback ----------------------------------------------------------------------------------


class FakeCDN:
    """A Steam store on 127.0.0.1 (GetItems gives no banner paths: the plain ones) whose CDN counts requests per
    appid and misbehaves on purpose."""

    def __init__(self, banner: bytes) -> None:
        self.hits: dict[int, int] = {}
        self.lock = threading.Lock()
        cdn = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if (items := bare_items_answer(self.path)) is not None:
                    return self._send(200, items)
                appid = int(self.path.split("/")[3])  # /steam/apps/<appid>/library_600x900.jpg
                with cdn.lock:
                    cdn.hits[appid] = cdn.hits.get(appid, 0) + 1
                if appid == 500:
                    return self._send(500, b"")
                if appid == 1020:  # a tiny, absurdly tall banner
                    return self._send(200, png(1, 20_000))
                if appid == 45:  # 45 bytes at 0.1 s each: every read is quick, the whole is not
                    self.send_response(200)
                    self.send_header("Content-Length", "45")
                    self.end_headers()
                    for _ in range(45):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.1)
                    return None
                time.sleep(0.3)  # slow enough for concurrent misses to overlap
                return self._send(200, banner)

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = start_http_server(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.settings = {"steam_api_url": self.url, "assets_url": f"{self.url}/"}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fallback(built_index, make_app):
    """(the fake CDN, a function Settings overrides -> the Service with the fallback on)."""
    cdn = FakeCDN((built_index.banners / "30.jpg").read_bytes())

    def make(**settings):
        app = make_app(fallback_fetch=True, fallback_timeout=1, **cdn.settings, **settings)
        return app.extensions[EXTENSION_KEY]

    yield cdn, make
    cdn.close()


@pytest.mark.slow  # a model load
def test_fallback_asks_the_store_for_the_banner_path(make_app):
    """GetItems first, then the banner where the store says it is (under its content hash), never a guessed path."""
    steam = FakeSteam({4321: FakeGame("Re-uploaded art", hashed=True, token=7), 4322: FakeGame("Gone", visible=False)})
    try:
        store = {"steam_api_url": steam.url, "assets_url": f"{steam.url}/store_item_assets/"}
        svc = make_app(fallback_fetch=True, **store).extensions[EXTENSION_KEY]
        body = svc.fallback_match(4321, "SimpleS16", 3, "/")
        path = steam.banner_path(4321)
        assert body["query"]["banner_url"] == f"{steam.url}/store_item_assets/{path}?t=7" and len(body["matches"]) == 3
        assert steam.counts["GetItems"] == 1 and steam.counts[f"/store_item_assets/{path}"] == steam.counts["CDN"] == 1
        with pytest.raises(NotFound, match="Steam has no banner"):
            svc.fallback_match(4322, "SimpleS16", 3, "/")
        assert steam.counts["GetItems"] == 2 and steam.counts["CDN"] == 1  # not on the store: no banner asked for
    finally:
        steam.close()


def test_fallback_failures_are_cached_for_a_ttl(fallback):
    cdn, make = fallback
    svc = make(fallback_negative_ttl=60)
    for _ in range(4):
        with pytest.raises(UpstreamFailed, match="answered 500"):
            svc.fallback_match(500, "SimpleS16", 3, "/")
    assert cdn.hits[500] == 1
    expired = make(fallback_negative_ttl=0)
    for _ in range(2):
        with pytest.raises(UpstreamFailed):
            expired.fallback_match(500, "SimpleS16", 3, "/")
    assert cdn.hits[500] == 3  # a TTL of 0: every miss asks again


def test_fallback_a_miss_that_raced_a_finished_fetch_uses_its_answer(fallback):
    """A lookup that missed the memory just before another lookup's fetch was remembered fetches nothing again."""
    cdn, make = fallback
    svc = make(fallback_negative_ttl=60)
    with pytest.raises(UpstreamFailed):
        svc.fallback_match(500, "SimpleS16", 3, "/")
    cached, missed = svc.fetcher._cached, []

    def racing(key):  # the first check comes before the other fetch was remembered
        if not missed:
            missed.append(key)
            return None
        return cached(key)

    svc.fetcher._cached = racing
    with pytest.raises(UpstreamFailed, match="answered 500"):
        svc.fallback_match(500, "SimpleS16", 3, "/")
    assert missed and cdn.hits[500] == 1


@pytest.mark.slow  # a model load
def test_fallback_concurrent_misses_share_one_fetch_and_one_model_pass(fallback):
    cdn, make = fallback
    svc = make()
    passes = []
    embed = svc.matcher.embed
    svc.matcher.embed = lambda *a: passes.append(1) or embed(*a)
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: svc.fallback_match(4321, "SimpleS16", 3, "/"), range(10)))
    assert cdn.hits[4321] == 1 and len(passes) == 1
    assert all(r["matches"] == results[0]["matches"] for r in results) and results[0]["matches"][0]["appid"] == 30


@pytest.mark.slow
def test_fallback_has_a_total_deadline_not_one_per_read(fallback):
    _, make = fallback
    svc = make()
    with pytest.raises(UpstreamFailed, match="took longer than 1 s"):
        svc.fallback_match(45, "SimpleS16", 3, "/")


def test_fallback_applies_the_image_limits(fallback):
    _, make = fallback
    with pytest.raises(UpstreamFailed, match="aspect ratio of 20,000:1"):
        make().fallback_match(1020, "SimpleS16", 3, "/")


@pytest.mark.slow  # a model load
def test_fallback_model_pass_counts_against_the_upload_rate_limit(built_index, make_app):
    cdn = FakeCDN((built_index.banners / "30.jpg").read_bytes())
    try:
        app = make_app(fallback_fetch=True, fallback_timeout=1, upload_rate_limit=(1, 3600.0), **cdn.settings)
        client = app.test_client()
        assert client.get("/match/4321?strategy=SimpleS16&k=3").status_code == 200
        r = client.get("/match/4322?strategy=SimpleS16&k=3")  # a second model pass: over the upload budget
        assert r.status_code == 429 and r.get_json()["error"]["code"] == "rate_limited"
        cached = client.get("/match/4321?strategy=SimpleS16&k=3")  # cached: no model pass, no charge
        assert cached.status_code == 200 and cached.get_json()["k"] == 3
        assert client.get("/match/10?k=3").status_code == 200  # indexed games are never charged
    finally:
        cdn.close()


# -- headers and URLs ----------------------------------------------------------------------------------


def test_urls_come_from_public_url_never_from_host(client, make_client):
    plain = client
    r = plain.get("/match/10?k=3", headers={"Host": "evil.example"})
    assert r.headers["Cache-Control"].startswith("public")
    assert all(m["banner_url"].startswith("/banners/") for m in r.get_json()["matches"])
    page = plain.get("/render/10?k=3", headers={"Host": "evil.example"}).get_data(as_text=True)
    assert "evil.example" not in page and 'src="/banners/' in page
    public = make_client(public_url="https://cdn.example/x/")
    body = public.get("/match/10?k=3", headers={"Host": "evil.example"}).get_json()
    assert body["query"]["banner_url"] == "https://cdn.example/x/banners/10.jpg"
    assert Settings.from_env({"PUBLIC_URL": "https://a.example"}).public_url == "https://a.example/"
    with pytest.raises(ConfigError, match="PUBLIC_URL"):
        Settings.from_env({"PUBLIC_URL": "javascript:alert(1)"})


def test_vary_origin_whenever_cors_is_configured(make_client):
    for origins in (["https://a.example"], ["*"]):
        client = make_client(cors_origins=origins)
        for headers in ({}, {"Origin": "https://a.example"}, {"Origin": "https://other.example"}):
            assert "Origin" in client.get("/match/10", headers=headers).headers.get("Vary", ""), (origins, headers)


def test_cors_origins_as_copied_from_the_address_bar(make_client):
    """CORS_ORIGINS=https://front.example/, as the address bar shows it, allows the origin a browser sends (no
    slash); a value that cannot be an origin (a path, no scheme) stops start-up with one line."""
    settings = Settings.from_env({"CORS_ORIGINS": "https://front.example/, *"})
    client = make_client(cors_origins=settings.cors_origins)
    r = client.get("/match/10", headers={"Origin": "https://front.example"})
    assert r.headers.get("Access-Control-Allow-Origin") == "*"
    one = make_client(cors_origins=Settings.from_env({"CORS_ORIGINS": "https://front.example/"}).cors_origins)
    r = one.get("/match/10", headers={"Origin": "https://front.example"})
    assert r.headers.get("Access-Control-Allow-Origin") == "https://front.example"
    for bad in ("https://front.example/app", "front.example", "https://front.example/?a=1"):
        with pytest.raises(ConfigError, match="CORS_ORIGINS"):
            Settings.from_env({"CORS_ORIGINS": bad})


def test_security_headers_on_json_and_pages(client):
    for path in ("/match/10", "/health", "/match/nope", "/"):
        r = client.get(path)
        assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert "script-src 'none'" in client.get("/").headers["Content-Security-Policy"]  # the pages' own policy


# -- settings and index files: one clear line ----------------------------------------------------------


def test_zero_byte_array_and_unknown_preload_stop_startup_with_one_line(index_copy, make_app, built_index):
    with pytest.raises(StartupError, match=r"PRELOAD_MODELS='Nope': Nope not in the index .*; or 'all'\)"):
        make_app(preload_models=["Nope"])
    assert make_app(preload_models=["all"]).extensions[EXTENSION_KEY].preload == list(built_index.strategies)
    with pytest.raises(StartupError, match=r"DEFAULT_STRATEGY='all': all not in the index [^;]*\)"):
        make_app(default_strategy="all")
    (index_copy / "SimpleS16" / "neighbours.npy").write_bytes(b"")
    with pytest.raises(IndexInvalid, match=r"neighbours\.npy: not a readable \.npy file"):
        load_index(index_copy, verify="quick")


def test_quick_verify_still_range_checks_the_tables(index_copy):
    path = index_copy / "SimpleS16" / "neighbours.npy"
    table = np.load(path)
    flipped = table.copy()
    flipped[20, 5] = table[20, 5] ^ (1 << 20)  # one flipped bit: a row index far out of range
    with open(path, "r+b") as f:  # in place, as a bad disk or copy would: the manifest still matches in shape
        f.seek(len(path.read_bytes()) - table.nbytes)
        f.write(flipped.tobytes())
    with pytest.raises(IndexInvalid, match="indices out of range"):
        load_index(index_copy, verify="quick")
