"""Deploys: packing an index, fetching it at boot (good, corrupted, server down, slow), serving while starting,
and the requirements files kept in step."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import requests
from conftest import ROOT, GunicornServer, start_http_server

from app import create_app
from app.config import ConfigError, Settings
from core.dino.strategies import parse_strategies
from core.index import load_index
from core.index.fetch import FETCHED, FetchFailed, FetchPolicy, fetch_index, fetched_sha256
from devtools.synthetic import write_synthetic_index
from devtools.workspace import banner_jpeg
from indexer import pack
from indexer.cli.pack_index import main as pack_main
from indexer.pack import pack_index

FAST = FetchPolicy(attempts=2, backoff_s=0.05, timeout_s=2.0, max_seconds=3.0)


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    """A synthetic index of 40 apps and three strategies (no model needed)."""
    out = tmp_path_factory.mktemp("small") / "index"
    apps = [{"appid": 10 * (i + 1), "name": f"Game {i + 1}"} for i in range(40)]
    write_synthetic_index(out, apps, parse_strategies("SimpleS16,ComplexS16,ComplexB16"), k=5)
    return out


@pytest.fixture(scope="module")
def packed(small_index, tmp_path_factory):
    """ComplexB16 alone, packed; returns (folder served over HTTP, archive, sha256)."""
    folder = tmp_path_factory.mktemp("dist")
    p = pack_index(small_index, folder / "index.tar.gz", ["ComplexB16"])
    return folder, p.path, p.sha256


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves the files of ``folder``; ``mode``: "ok", "hold" (answers once ``release`` is set), "trickle"; the
    first ``failures`` requests get a 404 (a mirror not ready yet)."""

    folder: Path
    mode = "ok"
    release: threading.Event
    hits = 0
    failures = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        path = self.folder / self.path.lstrip("/")
        if self.mode == "hold":
            self.release.wait(30)
        if type(self).hits <= self.failures or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.mode == "trickle":
            for i in range(0, len(data), 64):
                try:
                    self.wfile.write(data[i : i + 64])
                    self.wfile.flush()
                except OSError:  # the client gave up, as it should
                    return
                time.sleep(0.3)
        else:
            self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def archive_server():
    """A local HTTP server for the archive; returns a function (folder, mode) -> (base URL, handler class)."""
    servers = []

    def serve(folder: Path, mode: str = "ok"):
        handler = type("H", (_Handler,), {"folder": folder, "mode": mode, "release": threading.Event(), "hits": 0})
        server = start_http_server(handler)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", handler

    yield serve
    for s in servers:
        s.RequestHandlerClass.release.set()
        s.shutdown()
        s.server_close()


# -- packing ----------------------------------------------------------------------------------------
def test_pack_writes_chosen_strategies_and_sha256(small_index, packed, tmp_path):
    _, archive, sha = packed
    assert hashlib.sha256(archive.read_bytes()).hexdigest() == sha
    assert archive.with_name(archive.name + ".sha256").read_text() == f"{sha}  {archive.name}\n"
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
        tar.extractall(tmp_path / "x", filter="data")
    arrays = [f"ComplexB16/{a}" for a in ("embeddings.npy", "neighbours.npy", "scores.npy")]
    sketch = [f"ComplexB16/sketch/{a}" for a in ("codes.npy", "columns.npy", "rows.npy")]
    assert names == ["ComplexB16", *arrays, "ComplexB16/sketch", *sketch, "apps.json", "manifest.json"]
    unpacked = load_index(tmp_path / "x", verify="full")
    assert list(unpacked.strategies) == ["ComplexB16"] and len(unpacked) == 40
    assert unpacked.strategies["ComplexB16"].sketch is not None
    again = pack_index(small_index, tmp_path / "again.tar.gz", ["ComplexB16"])
    assert again.sha256 == sha, "the same index must pack to the same bytes"


def test_pack_command_refuses_bad_input(small_index, tmp_path, capsys):
    assert pack_main(["--index", str(small_index), "--out", str(tmp_path / "a.tar"), "--strategies", "Nope"]) == 2
    assert "Nope" in capsys.readouterr().err and not (tmp_path / "a.tar").exists()
    assert pack_main(["--index", str(tmp_path / "none"), "--out", str(tmp_path / "a.tar")]) == 2
    assert pack_main(["--index", str(small_index), "--out", str(tmp_path / "all.tar")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"INDEX_SHA256=[0-9a-f]{64}", out)
    assert re.search(r"uploads on ComplexB16 keep \d+ MiB of sketch and the DINO ViT-B/16 weights in the page", out)
    assert list(load_index_from_tar(tmp_path / "all.tar", tmp_path / "u").strategies) == [
        "SimpleS16",
        "ComplexS16",
        "ComplexB16",
    ]


def load_index_from_tar(archive: Path, dest: Path):
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return load_index(dest)


# -- fetching -------------------------------------------------------------------------------------------
def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def test_fetch_good_archive_once(packed, archive_server, tmp_path):
    folder, archive, sha = packed
    url, handler = archive_server(folder)
    dest = tmp_path / "data" / "index"
    assert fetch_index(f"{url}/{archive.name}", sha, dest, FAST) is True
    assert fetched_sha256(dest) == sha and json.loads((dest / FETCHED).read_text())["url"].endswith(archive.name)
    assert list(load_index(dest, verify="full").strategies) == ["ComplexB16"]
    assert fetch_index(f"{url}/{archive.name}", sha, dest, FAST) is False, "already there: no second download"
    assert handler.hits == 1
    assert _leftovers(dest.parent) == []


def test_corrupted_archive_changes_nothing(packed, archive_server, tmp_path, small_index):
    _, archive, sha = packed
    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / archive.name).write_bytes(bytes(data))
    url, handler = archive_server(bad)
    dest = tmp_path / "index"
    with pytest.raises(FetchFailed, match="sha256"):
        fetch_index(f"{url}/{archive.name}", sha, dest, FAST)
    assert handler.hits == FAST.attempts and not dest.exists() and _leftovers(tmp_path) == []
    # an archive whose sha256 is right but whose index is not (packed by hand): refused before the swap
    broken = tmp_path / "broken.tar"
    with tarfile.open(broken, "w") as tar:
        tar.add(small_index / "manifest.json", "manifest.json")
    (bad / "broken.tar").write_bytes(broken.read_bytes())
    sha_broken = hashlib.sha256(broken.read_bytes()).hexdigest()
    with pytest.raises(FetchFailed, match=r"apps\.json"):
        fetch_index(f"{url}/broken.tar", sha_broken, dest, FAST)
    assert not dest.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
def test_server_down_and_slow_server_fail_in_bounded_time(packed, archive_server, tmp_path):
    _, archive, sha = packed
    t0 = time.monotonic()
    with pytest.raises(FetchFailed, match="2 attempts"):
        fetch_index("http://127.0.0.1:9/index.tar.gz", sha, tmp_path / "index", FAST)  # discard port: refused
    folder, _, _ = packed
    url, handler = archive_server(folder, "trickle")
    with pytest.raises(FetchFailed, match="too long"):
        fetch_index(f"{url}/{archive.name}", sha, tmp_path / "index", FAST)
    assert time.monotonic() - t0 < 30 and handler.hits == 2
    assert not (tmp_path / "index").exists() and _leftovers(tmp_path) == []


# -- the service while it fetches --------------------------------------------------------------------------
def _settings(dest: Path, url: str, sha: str, **extra) -> Settings:
    env = {"INDEX_DIR": str(dest), "INDEX_URL": url, "INDEX_SHA256": sha, "INDEX_FETCH_ATTEMPTS": "2"}
    env |= {"INDEX_FETCH_TIMEOUT": "3", "ALLOW_WEIGHTS_DOWNLOAD": "0", "BANNERS_DIR": str(dest.parent / "banners")}
    return Settings.from_env(env | extra)


def _wait_ready(client, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/health")
        if r.status_code == 200:
            return r
        time.sleep(0.05)
    raise AssertionError(f"not ready: {r.get_json()}")


def test_answers_503_starting_until_the_index_is_in_place(packed, archive_server, tmp_path):
    folder, archive, sha = packed
    url, handler = archive_server(folder, "hold")
    client = create_app(_settings(tmp_path / "index", f"{url}/{archive.name}", sha)).test_client()
    r = client.get("/health")
    assert r.status_code == 503 and r.get_json()["status"] == "starting" and r.headers["Retry-After"]
    for path in ("/match/10", "/strategies", "/apps?q=game"):
        r = client.get(path)
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "starting", path
    page = client.get("/")  # a browser gets the HTML error page, with the pages' policy
    assert page.status_code == 503 and page.mimetype == "text/html"
    assert "script-src 'none'" in page.headers["Content-Security-Policy"]
    handler.release.set()
    h = _wait_ready(client).get_json()
    assert h["status"] == "ok" and h["apps"] == 40 and h["strategies"] == ["ComplexB16"]
    assert client.get("/match/10").status_code == 200


def test_a_failed_fetch_keeps_serving_the_previous_index(packed, archive_server, small_index, tmp_path):
    folder, archive, sha = packed
    url, _ = archive_server(folder)
    dest = tmp_path / "index"
    fetch_index(f"{url}/{archive.name}", sha, dest, FAST)
    other_sha = "f" * 64  # a new release whose archive cannot be had
    client = create_app(_settings(dest, f"{url}/missing.tar.gz", other_sha, INDEX_FETCH_ATTEMPTS="1")).test_client()
    h = _wait_ready(client).get_json()
    assert h["strategies"] == ["ComplexB16"] and fetched_sha256(dest) == sha


def test_index_settings_are_checked():
    with pytest.raises(ConfigError, match="INDEX_SHA256"):
        Settings.from_env({"INDEX_URL": "https://example.org/i.tar"})
    with pytest.raises(ConfigError, match="INDEX_SHA256"):
        Settings.from_env({"INDEX_URL": "https://example.org/i.tar", "INDEX_SHA256": "abc"})
    with pytest.raises(ConfigError, match="without INDEX_URL"):
        Settings.from_env({"INDEX_SHA256": "a" * 64})
    with pytest.raises(ConfigError, match="http"):
        Settings.from_env({"INDEX_URL": "file:///x", "INDEX_SHA256": "a" * 64})


@pytest.mark.slow
def test_gunicorn_binds_at_once_and_fetches_in_the_background(packed, archive_server, tmp_path):
    """The Procfile's command with INDEX_URL: /health answers 503 while the archive server holds, then 200."""
    folder, archive, sha = packed
    url, handler = archive_server(folder, "hold")
    env = {
        "INDEX_DIR": str(tmp_path / "index"),
        "INDEX_URL": f"{url}/{archive.name}",
        "INDEX_SHA256": sha,
        "TORCH_HOME": str(tmp_path / "torch"),
        "ALLOW_WEIGHTS_DOWNLOAD": "0",
    }
    srv = GunicornServer(env, tmp_path / "gunicorn.log")
    try:
        deadline = time.monotonic() + 30
        status = None
        while status is None and time.monotonic() < deadline:
            try:
                status = requests.get(srv.url + "/health", timeout=2)
            except requests.RequestException:
                time.sleep(0.05)
        assert status is not None and status.status_code == 503, srv.output()[-2000:]
        assert status.json()["status"] == "starting"
        handler.release.set()
        srv.wait_ready(timeout=60)
        # each worker loads the fetched index on its own: one may answer /health before the other is ready
        deadline = time.monotonic() + 60
        codes = []
        while codes[-20:] != [200] * 20 and time.monotonic() < deadline:
            codes.append(requests.get(srv.url + "/match/10", timeout=5).status_code)
            assert codes[-1] in (200, 503), codes
        assert codes[-20:] == [200] * 20, codes[-40:]
        assert handler.hits == 1, "the workers share one download"
        # an upload is decoded (by the master's decoder launcher, in a master without the app), then needs the
        # checkpoint, which this test has not
        r = requests.post(srv.url + "/match", data=banner_jpeg(1), headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "weights_unavailable", r.text
    finally:
        srv.stop()


# -- requirements ---------------------------------------------------------------------------------------
def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)", line.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_requirements_files_pin_the_same_versions():
    """requirements.txt (deploys: CPU wheels) and requirements-dev.txt (here and CI) must not drift apart."""
    deploy, dev = _pins(ROOT / "requirements.txt"), _pins(ROOT / "requirements-dev.txt")
    text = (ROOT / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    for name in ("torch", "torchvision"):
        assert deploy[name].endswith("+cpu"), f"requirements.txt must pin the CPU build of {name}"
        assert dev[name] == deploy[name].removesuffix("+cpu"), f"{name}: {dev[name]} vs {deploy[name]}"
    for name, version in deploy.items():
        if name not in ("torch", "torchvision"):
            assert dev.get(name) == version, f"{name}: requirements-dev.txt has {dev.get(name)}, deploys {version}"
    python = (ROOT / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.\d+", python)
    docker = (ROOT / "Dockerfile").read_text()
    assert f"FROM python:{python}-slim" in docker and "requirements.txt" in docker


def test_a_fetch_killed_midway_leaves_no_partial_archive_behind(packed, archive_server, tmp_path):
    folder, archive, sha = packed
    slow, _ = archive_server(folder, "trickle")
    dest = tmp_path / "data" / "index"
    code = (
        "from pathlib import Path; from core.index.fetch import FetchPolicy, fetch_index; "
        f"fetch_index({slow + '/' + archive.name!r}, {sha!r}, Path({str(dest)!r}), FetchPolicy(attempts=1))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
        dest.parent.exists() and any(".archive-" in n for n in _leftovers(dest.parent))
    ):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)  # a worker OOM-killed, a dyno cycled mid-download
    proc.wait()
    assert any(".archive-" in n for n in _leftovers(dest.parent))
    url, _ = archive_server(folder)
    assert fetch_index(f"{url}/{archive.name}", sha, dest, FAST) is True
    assert _leftovers(dest.parent) == [], "a killed fetch's partial archive stays on the disk for good"


@pytest.mark.slow
def test_a_given_metrics_folder_that_does_not_exist_yet_is_made(small_index, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR=/tmp/metrics on a fresh (ephemeral) disk: the service starts, it does not die with
    prometheus_client's FileNotFoundError traceback."""
    metrics_dir = tmp_path / "not" / "there" / "yet"
    env = {"INDEX_DIR": str(small_index), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    srv = GunicornServer(env, tmp_path / "gunicorn.log")
    try:
        srv.wait_ready(timeout=60)
        assert requests.get(srv.url + "/metrics", timeout=5).status_code == 200
    finally:
        srv.stop()
    assert "Traceback" not in (tmp_path / "gunicorn.log").read_text()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("-", "-"), ("1", "-"), ("true", "-"), ("on", "-"), ("0", None), ("off", None), ("no", None)],
)
def test_access_log_switch_words_are_not_file_names(monkeypatch, tmp_path, value, expected):
    """ACCESS_LOG takes the switch words (1/0, on/off...) for stdout or none, not as file names; or a path."""
    monkeypatch.setenv("ACCESS_LOG", value)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert conf["accesslog"] == expected


@pytest.mark.slow
def test_health_is_not_ok_while_a_worker_still_fetches(packed, tmp_path):
    """/health answers 503 `starting` until every worker serves: two workers whose first fetch rounds fail, one
    then installing the index while the other pauses before its next round, are not both ready."""
    folder, archive, sha = packed
    handler = type("H", (_Handler,), {"folder": folder, "hits": 0, "failures": 3})
    server = start_http_server(handler)
    env = {
        "INDEX_DIR": str(tmp_path / "index"),
        "INDEX_URL": f"http://127.0.0.1:{server.server_address[1]}/{archive.name}",
        "INDEX_SHA256": sha,
        "INDEX_FETCH_ATTEMPTS": "1",
        "TORCH_HOME": str(tmp_path / "torch"),
        "ALLOW_WEIGHTS_DOWNLOAD": "0",
    }
    srv = GunicornServer(env, tmp_path / "gunicorn.log")
    try:
        srv.wait_ready(timeout=60)
        codes = [requests.get(srv.url + "/match/10", timeout=5).status_code for _ in range(40)]
        assert codes == [200] * 40, (codes, srv.output()[-3000:])
    finally:
        srv.stop()
        server.shutdown()
        server.server_close()


def test_pack_ctrl_c_is_a_short_message(built_index, run_main, tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pack, "load_index", interrupt)  # the full verification: the long part
    r = run_main(pack_main, "--index", str(built_index.index), "--out", str(tmp_path / "index.tar"))
    assert r.returncode == 130 and r.stderr.startswith("interrupted:"), r.stderr
    assert not (tmp_path / "index.tar").exists()
