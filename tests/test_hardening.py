"""Reliability and security: hostile uploads, bounded load, worker crashes, slow clients, start-up faults."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from conftest import GunicornServer, server_env, start_http_server
from PIL import Image

from app import StartupError, create_app
from app.config import ConfigError, Settings
from devtools.fake_steam import bare_items_answer

pytestmark = pytest.mark.slow  # the real gunicorn service: seconds to start and stop


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb() -> bytes:
    """A PNG that claims 50,000 x 40,000 RGB pixels (2 Gpx, 6 GB decoded) in a few hundred KB of zeros."""
    width, height = 50_000, 40_000
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\0" * (3 * width + 1)
    idat = zlib.compress(row * 200, 9)  # the first rows; a decoder would allocate for all of them
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bad_crc_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    length = struct.unpack(">I", data[idat - 4 : idat])[0]
    data[idat + 4 + length] ^= 0xFF  # the IDAT chunk's CRC
    return bytes(data)


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((300, 450), 80).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()[: len(buf.getvalue()) // 3]


HOSTILE = [
    ("png bomb", {"data": png_bomb(), "headers": {"Content-Type": "image/png"}}, 400, "too_many_pixels"),
    ("png bomb as form", {"files": {"image": ("bomb.png", png_bomb())}}, 400, "too_many_pixels"),
    ("truncated jpeg", {"data": truncated_jpeg(), "headers": {"Content-Type": "image/jpeg"}}, 400, "corrupt_image"),
    ("bad crc png", {"data": bad_crc_png(), "headers": {"Content-Type": "image/png"}}, 400, "corrupt_image"),
    (
        "html named .jpg",
        {"files": {"image": ("cover.jpg", b"<!doctype html><p>hi</p>", "image/jpeg")}},
        400,
        "not_an_image",
    ),
    (
        "svg as image/svg+xml",
        {"data": b'<svg xmlns="http://www.w3.org/2000/svg"/>', "headers": {"Content-Type": "image/svg+xml"}},
        415,
        "unsupported_media_type",
    ),
    (
        "svg as a form file",
        {"files": {"image": ("a.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')}},
        400,
        "not_an_image",
    ),
    ("empty body", {"data": b"", "headers": {"Content-Type": "image/jpeg"}}, 400, "empty_upload"),
    (
        "50 MB body",
        {"data": b"\xff\xd8" + b"\0" * (50 * 2**20), "headers": {"Content-Type": "image/jpeg"}},
        413,
        "too_large",
    ),
    ("text/plain", {"data": b"hello", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
    ("json", {"json": {"image": "aGVsbG8="}}, 400, "bad_url"),  # JSON is a query by URL (POST /match {"url"})
    ("urlencoded form", {"data": {"image": "x"}}, 415, "unsupported_media_type"),
    ("no content type", {"data": b"\xff\xd8\xff"}, 415, "unsupported_media_type"),
    ("tiff", {"data": b"II*\x00" + b"\0" * 64, "headers": {"Content-Type": "image/tiff"}}, 400, "not_an_image"),
]

BAD_PARAMS = [
    ("get", "/match/10?k=-1", 400, "bad_parameter"),
    ("get", "/match/10?k=99999999999999999999", 400, "bad_parameter"),
    ("get", "/match/10?k=%00", 400, "bad_parameter"),
    ("get", "/match/1e3", 400, "bad_appid"),
    ("get", "/match/%20", 400, "bad_appid"),
    ("get", "/match/%C2%B2", 400, "bad_appid"),
    ("get", "/match/%D9%A3", 400, "bad_appid"),
    ("get", "/match/10?k=%C2%B2", 400, "bad_parameter"),
    ("get", "/apps/%C2%B2", 400, "bad_appid"),
    ("get", "/match/10?strategy=%3Cscript%3E", 400, "unknown_strategy"),
    ("post", "/match?k=abc", 400, "bad_parameter"),
    ("post", "/match?strategy=Nope", 400, "unknown_strategy"),
    ("get", "/apps?q=" + "x" * 300, 400, "bad_parameter"),
    ("get", "/banners/%C2%B2.jpg", 404, "not_found"),
    ("get", "/unique?n=-3", 400, "bad_parameter"),
    ("get", "/compare/10?k=0", 400, "bad_parameter"),
]


def _check_still_correct(server, built_index) -> None:
    apps = json.loads((built_index.index / "apps.json").read_text())
    nbr = np.load(built_index.index / "SimpleS16" / "neighbours.npy")
    r = requests.get(f"{server.url}/match/{apps[3]['appid']}", params={"strategy": "SimpleS16", "k": 10}, timeout=10)
    assert [m["appid"] for m in r.json()["matches"]] == [apps[i]["appid"] for i in nbr[3]]
    data = (built_index.banners / f"{apps[5]['appid']}.jpg").read_bytes()
    up = requests.post(
        f"{server.url}/match?strategy=SimpleS16", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert up.status_code == 200 and up.json()["matches"][0]["appid"] == apps[5]["appid"]


@pytest.mark.slow
def test_hostile_inputs_get_clear_4xx_and_the_server_stays_correct(server, built_index):
    failures = []
    for name, kwargs, status, code in HOSTILE:
        try:
            r = requests.post(f"{server.url}/match?strategy=SimpleS16", timeout=60, **kwargs)
        except requests.RequestException as e:
            failures.append(f"{name}: no answer ({e})")
            continue
        body = r.json() if r.headers.get("Content-Type", "").startswith("application/json") else None
        if r.status_code != status or body is None or body["error"]["code"] != code:
            failures.append(f"{name}: {r.status_code} {r.text[:200]}")
    for method, path, status, code in BAD_PARAMS:
        r = getattr(requests, method)(server.url + path, timeout=10)
        if r.status_code != status or r.json()["error"]["code"] != code:
            failures.append(f"{path}: {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert "Traceback" not in server.output() and " 500 " not in server.output()
    _check_still_correct(server, built_index)


@pytest.mark.slow
def test_bounded_mixed_load_every_answer_checked(server, built_index):
    apps = json.loads((built_index.index / "apps.json").read_text())
    tables = {s: np.load(built_index.index / s / "neighbours.npy") for s in built_index.strategies}
    banners = {a["appid"]: (built_index.banners / f"{a['appid']}.jpg").read_bytes() for a in apps[:6]}
    rng = np.random.default_rng(0)
    jobs = [("get", int(rng.integers(len(apps))), built_index.strategies[i % 3]) for i in range(600)]
    jobs += [("post", apps[i % 6]["appid"], "SimpleS16") for i in range(12)]
    rng.shuffle(jobs)
    local = threading.local()

    def run(job):
        kind, target, strategy = job
        http = getattr(local, "http", None) or requests.Session()
        local.http = http
        if kind == "get":
            r = http.get(f"{server.url}/match/{apps[target]['appid']}", params={"strategy": strategy}, timeout=30)
            want = [apps[i]["appid"] for i in tables[strategy][target]]
            return r.status_code == 200 and [m["appid"] for m in r.json()["matches"]] == want
        for _ in range(5):  # a well-behaved client: 503 "busy" (upload admission) means try again after Retry-After
            r = http.post(
                f"{server.url}/match?strategy={strategy}&k=3",
                data=banners[target],
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            )
            if r.status_code != 503 or "Retry-After" not in r.headers:
                break
            time.sleep(int(r.headers["Retry-After"]))
        return r.status_code == 200 and r.json()["matches"][0]["appid"] == target

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.monotonic() - start
    assert all(results), f"{results.count(False)} of {len(results)} answers were wrong or missing"
    assert elapsed < 60


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.slow
def test_memory_stays_bounded_under_repeated_uploads(server, built_index):
    data = (built_index.banners / "10.jpg").read_bytes()

    def upload(_):
        r = requests.post(
            f"{server.url}/match?strategy=ComplexS16", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60
        )
        return r.status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(upload, range(8))) == {200}  # both workers have loaded ViT-S/16 by now
    before = {pid: _rss_kb(pid) for pid in server.workers()}
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(upload, range(20))) == {200}
    after = {pid: _rss_kb(pid) for pid in server.workers()}
    growth_mb = {pid: (after[pid] - before[pid]) / 1024 for pid in before if pid in after}
    assert growth_mb and max(growth_mb.values()) < 60, growth_mb


def test_worker_crash_is_recovered(server, built_index):
    old = server.workers(expect=2)
    os.kill(old[0], signal.SIGKILL)
    ok = 0
    deadline = time.monotonic() + 20
    while ok < 40 and time.monotonic() < deadline:
        try:
            if requests.get(f"{server.url}/match/10", timeout=5).status_code == 200:
                ok += 1
        except requests.ConnectionError:
            time.sleep(0.05)  # a request that was on the killed worker
    assert ok == 40
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the killed worker is reaped, a new one forked
        new = server.workers()
        if len(new) == 2 and old[0] not in new:
            break
        time.sleep(0.1)
    assert len(new) == 2 and old[0] not in new, (old, new)
    _check_still_correct(server, built_index)


@pytest.mark.slow
def test_slow_uploads_do_not_block_lookups(built_index, tmp_path):
    env = server_env(built_index, UPLOAD_TIMEOUT="4")
    srv = GunicornServer(env, tmp_path / "log")
    try:
        srv.wait_ready()
        assert len(srv.workers(expect=2)) == 2
        slow = []
        for _ in range(5):  # stalled uploads: each holds a few bytes of buffer, no thread
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
            s.sendall(b"\xff\xd8\xff\xe0")  # then nothing: a stalled client
            slow.append(s)
        time.sleep(0.3)
        start = time.monotonic()
        with requests.Session() as http:
            for _ in range(50):
                assert http.get(f"{srv.url}/match/10", timeout=5).status_code == 200
        assert time.monotonic() - start < 5
        # the stalled uploads are cut off: each thread is freed with a 408
        for s in slow:
            s.settimeout(15)
            reply = b""
            while b"}" not in reply:  # headers and body may come in separate segments
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            text = reply.decode(errors="replace")
            assert text.startswith("HTTP/1.1 408") and "upload_timeout" in text, text[:300]
            assert s.recv(4096) == b"", "the connection of a stalled upload must be closed"
            s.close()
    finally:
        srv.stop()


# -- start-up refusals ------------------------------------------------------------------------------


def _refused(index_dir, **settings) -> str:
    with pytest.raises(StartupError) as e:
        create_app(Settings(index_dir=index_dir, **settings))
    return str(e.value)


def test_refuses_missing_index(tmp_path):
    assert "no index folder here" in _refused(tmp_path / "nothing")


def test_refuses_half_written_index(index_copy):
    (index_copy / "ComplexB16" / "scores.npy").unlink()
    assert "scores.npy: missing" in _refused(index_copy)


def test_refuses_index_without_manifest(index_copy):
    (index_copy / "manifest.json").unlink()
    assert "manifest.json: missing" in _refused(index_copy)


def test_refuses_truncated_array(index_copy):
    path = index_copy / "SimpleS16" / "embeddings.npy"
    path.write_bytes(path.read_bytes()[:-100])
    assert "embeddings.npy" in _refused(index_copy)


def test_refuses_other_format_version(index_copy):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    msg = _refused(index_copy)
    assert "format version 99" in msg and "Rebuild" in msg


def test_refuses_checksum_mismatch(index_copy):
    path = index_copy / "ComplexS16" / "neighbours.npy"
    arr = np.load(path)
    arr[0, [0, 1]] = arr[0, [1, 0]]  # same shape and values, different order
    np.save(path, arr)
    assert "sha256 does not match" in _refused(index_copy)
    create_app(Settings(index_dir=index_copy, index_verify="quick"))  # quick mode trusts the files


def test_refuses_inconsistent_shapes(index_copy):
    manifest = json.loads((index_copy / "manifest.json").read_text())
    manifest["num_apps"] = 25
    (index_copy / "manifest.json").write_text(json.dumps(manifest))
    assert "manifest says 25" in _refused(index_copy)


def test_refuses_unknown_default_strategy_and_bad_env(index_copy):
    assert "DEFAULT_STRATEGY='SimpleB8': SimpleB8 not in the index" in _refused(index_copy, default_strategy="SimpleB8")
    with pytest.raises(ConfigError, match="MAX_UPLOAD_MB"):
        Settings.from_env({"MAX_UPLOAD_MB": "lots"})
    with pytest.raises(ConfigError, match="UPLOAD_RATE_LIMIT"):
        Settings.from_env({"UPLOAD_RATE_LIMIT": "ten per minute"})
    with pytest.raises(ConfigError, match="INDEX_VERIFY"):
        Settings.from_env({"INDEX_VERIFY": "maybe"})
    with pytest.raises(ConfigError, match=r"INDEX_URL=.https:///index.tar.: expected an http\(s\) URL with a host"):
        Settings.from_env({"INDEX_URL": "https:///index.tar", "INDEX_SHA256": "0" * 64})
    for bad in ("https://:443/index.tar", "http://[::1/index.tar"):
        with pytest.raises(ConfigError, match="INDEX_URL"):
            Settings.from_env({"INDEX_URL": bad, "INDEX_SHA256": "0" * 64})
    with pytest.raises(ConfigError, match="PUBLIC_URL"):
        Settings.from_env({"PUBLIC_URL": "https://:443/app"})
    assert Settings.from_env({"STEAM_ASSETS_URL": "HTTPS://cdn.example/"}).assets_url == "HTTPS://cdn.example/"
    with pytest.raises(ConfigError, match="one upload would not fit"):
        Settings.from_env({"MAX_UPLOAD_MB": "16", "UPLOAD_BUFFER_MB": "10"})
    assert Settings.from_env({"MAX_UPLOAD_MB": "100"}).upload_buffer_mb == 100  # the default grows with it


# -- unknown appids: the optional CDN fallback -------------------------------------------------------


class _CDN:
    """A fake Steam store on 127.0.0.1 (GetItems gives no banner paths: the plain ones) whose CDN counts requests and
    can misbehave per appid."""

    def __init__(self, banners):
        import http.server

        self.hits: dict[str, int] = {}
        cdn = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                cdn.hits[self.path] = cdn.hits.get(self.path, 0) + 1
                appid = self.path.split("/")[3]  # /steam/apps/<appid>/library_600x900.jpg
                if (items := bare_items_answer(self.path)) is not None:
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(items)
                elif appid == "777":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.end_headers()
                elif appid == "888":
                    self.send_response(200)
                    self.send_header("Content-Length", str(20 * 2**20))
                    self.end_headers()
                elif appid == "999":
                    body = (banners / "30.jpg").read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_response(404)
                    self.end_headers()

        self.server = start_http_server(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_fallback_fetch_only_from_the_cdn(built_index, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))
    cdn = _CDN(built_index.banners)
    try:
        off = create_app(Settings(index_dir=built_index.index)).test_client()
        assert off.get("/match/999").status_code == 404  # off by default
        assert not cdn.hits
        store = {"steam_api_url": cdn.url, "assets_url": f"{cdn.url}/"}
        app = create_app(Settings(index_dir=built_index.index, fallback_fetch=True, fallback_max_mb=1, **store))
        client = app.test_client()
        r = client.get("/match/999?strategy=SimpleS16&k=3")
        assert r.status_code == 200, r.data
        body = r.get_json()
        assert body["query"]["appid"] == 999 and body["query"]["source"] == "steam_cdn"
        assert body["matches"][0]["appid"] == 30 and body["matches"][0]["score"] > 0.998  # the same picture
        assert client.get("/match/999?strategy=SimpleS16&k=3").get_json() == body
        assert cdn.hits["/steam/apps/999/library_600x900.jpg"] == 1  # cached
        missing = client.get("/match/555")
        assert missing.status_code == 404 and "Steam has no banner" in missing.get_json()["error"]["message"]
        client.get("/match/555")
        assert cdn.hits["/steam/apps/555/library_600x900.jpg"] == 1  # the absence is cached too
        redirect = client.get("/match/777")
        assert redirect.status_code == 502 and "redirect" in redirect.get_json()["error"]["message"]
        assert len([p for p in cdn.hits if p.startswith("/steam/apps/777")]) == 1  # not followed
        big = client.get("/match/888")
        assert big.status_code == 502 and "larger than" in big.get_json()["error"]["message"]
    finally:
        cdn.close()


@pytest.mark.slow
def test_fallback_unreachable_cdn_is_502(built_index):
    unreachable = {"steam_api_url": "http://127.0.0.1:9", "fallback_timeout": 1}
    app = create_app(Settings(index_dir=built_index.index, fallback_fetch=True, **unreachable))
    r = app.test_client().get("/match/4242")
    assert r.status_code == 502 and r.get_json()["error"]["code"] == "fallback_failed"
