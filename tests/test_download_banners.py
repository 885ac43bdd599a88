"""The banner downloader against a real local HTTP server: retries, 404 memory, validation, atomic writes,
resume, and the CLI's exit codes and summary line. Nothing here reaches the internet. The store's own banner
paths (hashed, re-uploaded) are tested with the fake store in tests/test_catalog.py.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
from conftest import start_http_server
from PIL import Image, ImageDraw

from core.apps import AppsInvalid, load_apps
from core.http import RetryPolicy
from devtools.fake_steam import FakeGame, FakeSteam
from indexer import download as dl
from indexer.download import download_banners, image_problem

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "download_banners.py"
DEFAULT_LIST = ROOT / "catalogs" / "default_games.json"
SUMMARY_RE = re.compile(
    r"^banners: (\d+) requested, (\d+) downloaded \(\d+ changed in the store\), (\d+) skipped \(unchanged\), "
    r"(\d+) missing \(404\), (\d+) failed in \d+\.\d s$"
)
FAST = {"timeout": 2.0, "retries": 2, "backoff": 0.01, "progress": False}


@cache
def banner_bytes(appid: int) -> bytes:
    """A deterministic 300x450 JPEG per appid, as the CDN would serve it."""
    img = Image.new("RGB", (300, 450), ((appid * 37) % 256, (appid * 91) % 256, (appid * 13) % 256))
    draw = ImageDraw.Draw(img)
    for i in range(6):
        x, y = (appid * (i + 3) * 17) % 250, (appid * (i + 5) * 29) % 400
        draw.rectangle([x, y, x + 40, y + 40], fill=((i * 40) % 256, (appid + i * 70) % 256, 200))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


class FakeCDN:
    """What each appid does on the fake CDN, and how many requests each path got."""

    def __init__(self) -> None:
        self.routes: dict[int, str] = {}
        self.counts: Counter[str] = Counter()
        self.slow_s = 1.0
        self.retry_after = "1"
        self.lock = threading.Lock()
        self.url = ""

    def hits(self, appid: int) -> int:
        with self.lock:
            return self.counts[f"/steam/apps/{appid}/library_600x900.jpg"]


def _handler_for(cdn: FakeCDN) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            with cdn.lock:
                cdn.counts[self.path] += 1
                n = cdn.counts[self.path]
            m = re.fullmatch(r"/steam/apps/(\d+)/library_600x900\.jpg", self.path)
            behaviour = cdn.routes.get(int(m.group(1))) if m else None
            # The client may have given up (timeout) before a slow answer: expected, not an error.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._serve(int(m.group(1)) if m else 0, behaviour, n)

        def _serve(self, appid: int, behaviour: str | None, n: int) -> None:
            body = banner_bytes(appid)
            if behaviour == "ok" or (behaviour in ("503_once", "429_once", "slow_once") and n > 1):
                self._send(200, body)
            elif behaviour == "503_once":
                self._send(503, b"busy", "text/plain")
            elif behaviour == "429_once":
                self._send(429, b"slow down", "text/plain", {"Retry-After": cdn.retry_after})
            elif behaviour in ("slow", "slow_once"):
                time.sleep(cdn.slow_s)
                self._send(200, body)
            elif behaviour == "html":
                self._send(200, b"<!doctype html><html><body>Access denied</body></html>", "text/html")
            elif behaviour == "truncated":
                self._send(200, body[: len(body) // 2])
            elif behaviour == "cut":  # promises the whole body, sends half, hangs up
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
            elif behaviour == "403":
                self._send(403, b"forbidden", "text/plain")
            else:
                self._send(404, b"not found", "text/plain")

    return Handler


@pytest.fixture
def cdn():
    """A fake Steam CDN on 127.0.0.1 (free port), in a thread; configure `cdn.routes[appid] = behaviour`."""
    fake = FakeCDN()
    server = start_http_server(_handler_for(fake))
    server.handle_error = lambda *a: None
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


def _temp_files(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name]


def _run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def _load_script_module():
    return importlib.import_module("indexer.cli.download_banners")


# --- the library ---------------------------------------------------------------------------------------


def test_downloads_are_valid_and_identical(cdn, tmp_path):
    appids = [10, 20, 730, 413150]
    for a in appids:
        cdn.routes[a] = "ok"
    out = tmp_path / "banners"
    s = download_banners([{"appid": a, "name": f"G{a}"} for a in appids], out, assets_url=cdn.url, workers=3, **FAST)
    assert s.ok and s.requested == 4 and s.downloaded == sorted(appids)
    assert s.skipped == [] and s.missing == [] and s.failed == {}
    for a in appids:
        data = (out / f"{a}.jpg").read_bytes()
        assert data == banner_bytes(a)
        with Image.open(out / f"{a}.jpg") as im:
            assert im.size == (300, 450) and im.format == "JPEG"
        assert cdn.hits(a) == 1
    assert _temp_files(out) == []
    assert json.loads((out / dl.RECORD_FILE).read_text())["missing"] == {}
    assert SUMMARY_RE.match(s.line())


def test_404_is_missing_not_retried_and_remembered(cdn, tmp_path):
    cdn.routes[10] = "ok"
    out = tmp_path / "b"
    s = download_banners([10, 99], out, assets_url=cdn.url, **FAST)
    assert s.ok and s.missing == [99] and s.downloaded == [10]
    assert cdn.hits(99) == 1
    assert not (out / "99.jpg").exists()
    assert json.loads((out / "banners.json").read_text())["missing"] == {"99": "steam/apps/99/library_600x900.jpg"}

    s2 = download_banners([10, 99], out, assets_url=cdn.url, **FAST)
    assert s2.missing == [99] and s2.skipped == [10] and s2.downloaded == []
    assert cdn.hits(99) == 1  # remembered, not asked again

    cdn.routes[99] = "ok"  # the banner appeared meanwhile
    s3 = download_banners([10, 99], out, assets_url=cdn.url, retry_missing=True, **FAST)
    assert s3.downloaded == [99] and s3.missing == []
    assert cdn.hits(99) == 2
    assert json.loads((out / "banners.json").read_text())["missing"] == {}
    assert _temp_files(out) == []


def test_503_is_retried_then_succeeds(cdn, tmp_path):
    cdn.routes[20] = "503_once"
    s = download_banners([20], tmp_path, assets_url=cdn.url, **FAST)
    assert s.ok and s.downloaded == [20]
    assert cdn.hits(20) == 2
    assert (tmp_path / "20.jpg").read_bytes() == banner_bytes(20)


@pytest.mark.slow
def test_429_honours_retry_after(cdn, tmp_path):
    cdn.routes[30] = "429_once"
    cdn.retry_after = "1"
    t0 = time.monotonic()
    s = download_banners([30], tmp_path, assets_url=cdn.url, **FAST)
    assert s.ok and s.downloaded == [30] and cdn.hits(30) == 2
    assert time.monotonic() - t0 >= 0.9  # waited as asked, not the 10 ms backoff


def test_429_retry_after_is_capped(cdn, tmp_path):
    cdn.routes[30] = "429_once"
    cdn.retry_after = "3600"
    t0 = time.monotonic()
    s = download_banners([30], tmp_path, assets_url=cdn.url, max_retry_after=0.1, **FAST)
    assert s.ok and s.downloaded == [30]
    assert time.monotonic() - t0 < 3


def test_slow_response_times_out_and_fails_after_retries(cdn, tmp_path):
    cdn.routes[40] = "slow"
    cdn.routes[10] = "ok"
    cdn.slow_s = 1.0
    s = download_banners([10, 40], tmp_path, assets_url=cdn.url, timeout=0.25, retries=1, backoff=0.01, progress=False)
    assert not s.ok and list(s.failed) == [40] and s.downloaded == [10]
    assert "timeout" in s.failed[40].lower() or "timed out" in s.failed[40].lower()
    assert "2 attempts" in s.failed[40]
    assert cdn.hits(40) == 2
    assert not (tmp_path / "40.jpg").exists() and _temp_files(tmp_path) == []
    assert SUMMARY_RE.match(s.line()).groups() == ("2", "1", "0", "0", "1")


def test_slow_first_attempt_then_fast_succeeds(cdn, tmp_path):
    cdn.routes[50] = "slow_once"
    cdn.slow_s = 1.0
    s = download_banners([50], tmp_path, assets_url=cdn.url, timeout=0.25, retries=2, backoff=0.01, progress=False)
    assert s.ok and s.downloaded == [50] and cdn.hits(50) == 2
    assert (tmp_path / "50.jpg").read_bytes() == banner_bytes(50)


@pytest.mark.parametrize("behaviour", ["html", "truncated"])
def test_non_image_bodies_are_rejected(cdn, tmp_path, behaviour):
    cdn.routes[60] = behaviour
    s = download_banners([60], tmp_path, assets_url=cdn.url, **FAST)
    assert list(s.failed) == [60] and "not a valid image" in s.failed[60]
    assert cdn.hits(60) == 1  # the content is the answer: no retry
    assert not (tmp_path / "60.jpg").exists() and _temp_files(tmp_path) == []


def test_other_4xx_fails_without_retry(cdn, tmp_path):
    cdn.routes[70] = "403"
    s = download_banners([70], tmp_path, assets_url=cdn.url, **FAST)
    assert s.failed == {70: "HTTP 403"} and s.missing == [] and cdn.hits(70) == 1
    assert json.loads((tmp_path / "banners.json").read_text())["missing"] == {}


def test_body_cut_midway_never_lands_under_final_name(cdn, tmp_path):
    cdn.routes[80] = "cut"
    s = download_banners([80], tmp_path, assets_url=cdn.url, **FAST)
    assert list(s.failed) == [80] and "attempts" in s.failed[80]
    assert cdn.hits(80) == FAST["retries"] + 1  # a broken transfer is transient: retried
    assert not (tmp_path / "80.jpg").exists() and _temp_files(tmp_path) == []


def test_final_file_only_appears_complete(cdn, tmp_path, monkeypatch):
    """At the rename the temp file holds the whole validated body and the final name does not exist yet."""
    cdn.routes[90] = "ok"
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        if Path(dst).suffix == ".jpg":  # not the record of paths beside the banners
            seen.append((Path(src).name, Path(dst).exists(), Path(src).read_bytes() == banner_bytes(90)))
        return real_replace(src, dst)

    monkeypatch.setattr(dl.os, "replace", spy)
    s = download_banners([90], tmp_path, assets_url=cdn.url, **FAST)
    assert s.ok
    assert len(seen) == 1
    tmp_name, final_existed, complete = seen[0]
    assert tmp_name.startswith(".90.jpg.tmp-") and not final_existed and complete
    assert not re.fullmatch(r"\d+\.(jpg|jpeg|png|webp)", tmp_name)  # the index builder never reads it


def test_write_failure_leaves_nothing_behind(cdn, tmp_path, monkeypatch):
    cdn.routes[91] = "ok"

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dl.os, "fsync", broken_fsync)
    s = download_banners([91], tmp_path, assets_url=cdn.url, **FAST)
    assert list(s.failed) == [91] and "cannot write" in s.failed[91]
    assert not (tmp_path / "91.jpg").exists() and _temp_files(tmp_path) == []


def test_resume_skips_valid_and_redownloads_corrupt(cdn, tmp_path):
    appids = [10, 20, 30, 40]
    for a in appids:
        cdn.routes[a] = "ok"
    first = download_banners(appids, tmp_path, assets_url=cdn.url, **FAST)
    assert first.downloaded == appids

    second = download_banners(appids, tmp_path, assets_url=cdn.url, **FAST)
    assert second.downloaded == [] and second.skipped == appids and second.ok
    assert all(cdn.hits(a) == 1 for a in appids)

    (tmp_path / "20.jpg").write_bytes(banner_bytes(20)[:1000])  # cut short by a crash
    (tmp_path / "30.jpg").write_bytes(b"")  # empty
    third = download_banners(appids, tmp_path, assets_url=cdn.url, **FAST)
    assert third.downloaded == [20, 30] and third.skipped == [10, 40]
    assert (tmp_path / "20.jpg").read_bytes() == banner_bytes(20)
    assert (tmp_path / "30.jpg").read_bytes() == banner_bytes(30)
    assert cdn.hits(10) == 1 and cdn.hits(20) == 2 and cdn.hits(30) == 2
    assert _temp_files(tmp_path) == []


KILLED_RUN = """
import json, sys
from indexer.download import download_banners
download_banners(json.load(open(sys.argv[1])), sys.argv[2], assets_url=sys.argv[3], workers=1, progress=False)
"""


def test_a_killed_run_keeps_what_it_finished(tmp_path):
    """Killed (the OOM killer, a reboot; no finally runs), a run keeps its results: the rerun does not take the
    finished banners, whose store paths carry a token, for stale ones and download them again."""
    games = {appid: FakeGame(f"Game {appid}", hashed=appid % 2 == 0) for appid in range(1, 31)}
    steam = FakeSteam(games)
    try:
        apps = [{"appid": a, "name": g.name, "banner": f"{steam.banner_path(a)}?t=1"} for a, g in games.items()]
        apps_file, out, assets = tmp_path / "apps.json", tmp_path / "banners", steam.env()["STEAM_ASSETS_URL"]
        apps_file.write_text(json.dumps(apps))
        steam.faults["CDN"], steam.slow_s = ["slow"] * 30, 0.1
        run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, apps_file, out, assets], cwd=ROOT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(out.glob("*.jpg"))) < 10 and run.poll() is None:
            time.sleep(0.01)
        run.kill()
        assert run.wait() == -signal.SIGKILL
        done = {int(p.stem) for p in out.glob("*.jpg")}
        steam.faults["CDN"].clear()
        again = download_banners(apps, out, assets_url=assets, **FAST)
        assert again.ok and not (out / dl.JOURNAL_FILE).exists()
        # at most the banner written but not yet journaled when the kill came is fetched again
        assert len(done - set(again.skipped)) <= 1, (sorted(done), again.skipped)
    finally:
        steam.close()


def test_stale_temp_files_are_cleaned_at_start(cdn, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".10.jpg.tmp-{dead.pid}-140001", tmp_path / f".banners.json.tmp-{dead.pid}"]
    for p in stale:
        p.write_bytes(b"\xff\xd8 half a jpeg")
    alive = tmp_path / f".20.jpg.tmp-{os.getppid()}-1"  # another live process's write in progress
    alive.write_bytes(b"in progress")
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    cdn.routes[10] = "ok"
    s = download_banners([10], tmp_path, assets_url=cdn.url, **FAST)
    assert s.ok
    assert not any(p.exists() for p in stale)
    assert alive.exists() and unrelated.exists()


def test_duplicates_are_fetched_once(cdn, tmp_path):
    cdn.routes[10] = "ok"
    s = download_banners([10, {"appid": 10, "name": "again"}, 10], tmp_path, assets_url=cdn.url, **FAST)
    assert s.requested == 1 and s.downloaded == [10] and cdn.hits(10) == 1


def test_mixed_run_summary(cdn, tmp_path):
    routes = {1: "ok", 2: "ok", 3: "503_once", 4: "html", 5: "truncated", 7: "403"}  # 6: 404
    cdn.routes.update(routes)
    s = download_banners(range(1, 8), tmp_path, assets_url=cdn.url, workers=4, **FAST)
    assert s.downloaded == [1, 2, 3] and s.missing == [6] and sorted(s.failed) == [4, 5, 7]
    assert SUMMARY_RE.match(s.line()).groups() == ("7", "3", "0", "1", "3")


def test_image_problem():
    assert image_problem(banner_bytes(1)) is None
    assert "empty" in image_problem(b"")
    assert "not a valid image" in image_problem(b"<html></html>")
    assert "not a valid image" in image_problem(banner_bytes(1)[:-20])


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ('{"appid": 10}', "expected a JSON list"),
        ('[{"name": "x"}]', "entry 0 has no integer 'appid'"),
        ('[{"appid": "10", "name": "x"}]', "entry 0 has no integer 'appid'"),
        ('[{"appid": true}]', "entry 0 has no integer 'appid'"),
        ('[{"appid": 10, "name": "ok"}, {"appid": 1.5}]', "entry 1"),
        ('[{"appid": -3}]', "non-positive"),
        ('[{"appid": 10, "name": 3}]', "non-string 'name'"),
        ("[10, 20]", "entry 0 is int"),
    ],
)
def test_load_apps_rejects_bad_files(tmp_path, content, fragment):
    path = tmp_path / "apps.json"
    path.write_text(content)
    with pytest.raises(AppsInvalid, match=re.escape(fragment)):
        load_apps(path)


def test_load_apps_unreadable(tmp_path):
    with pytest.raises(AppsInvalid, match="cannot read"):
        load_apps(tmp_path / "nope.json")


# --- the shipped default list --------------------------------------------------------------------------


def test_default_list_is_valid():
    apps = load_apps(DEFAULT_LIST)
    appids = [a["appid"] for a in apps]
    assert 250 <= len(apps) <= 400
    assert len(set(appids)) == len(appids)
    assert appids == sorted(appids)
    assert all(isinstance(a["appid"], int) and a["appid"] > 0 for a in apps)
    assert all(isinstance(a["name"], str) and a["name"].strip() for a in apps)
    raw = json.loads(DEFAULT_LIST.read_text(encoding="utf-8"))
    assert all(set(entry) == {"appid", "name"} for entry in raw)
    names = {a["appid"]: a["name"] for a in apps}
    assert names[10] == "Counter-Strike" and names[620] == "Portal 2"


# --- the CLI -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_end_to_end(cdn, tmp_path):
    cdn.routes.update({10: "ok", 20: "ok", 30: "html"})  # 40: 404
    apps = tmp_path / "apps.json"
    apps.write_text(json.dumps([{"appid": a, "name": f"G{a}"} for a in (10, 20, 30, 40, 10)]))
    out = tmp_path / "data" / "banners"
    args = ("--apps", str(apps), "--out", str(out), "--cdn-url", cdn.url, "--workers", "2", "--backoff", "0.01")

    r = _run_cli(*args)
    assert r.returncode == 1, r.stderr
    assert r.stdout.count("\n") == 1  # only the summary on stdout; the progress bar goes to stderr
    assert SUMMARY_RE.match(r.stdout.strip()).groups() == ("4", "2", "0", "1", "1")
    assert re.search(r"^failed: 30: not a valid image", r.stderr, re.M)
    assert sorted(p.name for p in out.iterdir()) == ["10.jpg", "20.jpg", "banners.json"]

    cdn.routes[30] = "ok"
    r2 = _run_cli(*args, "--no-progress")
    assert r2.returncode == 0, r2.stderr
    assert SUMMARY_RE.match(r2.stdout.strip()).groups() == ("4", "1", "2", "1", "0")
    assert cdn.hits(40) == 1
    assert (out / "30.jpg").read_bytes() == banner_bytes(30)


@pytest.mark.slow
def test_cli_uses_default_list_without_apps(cdn, tmp_path):
    n = len(json.loads(DEFAULT_LIST.read_text(encoding="utf-8")))
    out = tmp_path / "out"
    r = _run_cli("--out", str(out), "--cdn-url", cdn.url, "--workers", "16", "--no-progress")
    assert r.returncode == 0, r.stderr  # every appid answers 404 here: missing, not failed
    assert SUMMARY_RE.match(r.stdout.strip()).groups() == (str(n), "0", "0", str(n), "0")
    assert len(json.loads((out / "banners.json").read_text())["missing"]) == n


def test_cli_bad_apps_file_exit_2_and_creates_nothing(cdn, tmp_path):
    apps = tmp_path / "apps.json"
    apps.write_text('[{"appid": "ten", "name": "x"}]')
    out = tmp_path / "never"
    r = _run_cli("--apps", str(apps), "--out", str(out), "--cdn-url", cdn.url)
    assert r.returncode == 2
    assert "error:" in r.stderr and "appid" in r.stderr
    assert r.stdout == ""
    assert not out.exists()
    assert sum(cdn.counts.values()) == 0


@pytest.mark.parametrize("url", ["ftp://cdn.example/", "cdn.example", "https://", "https://:443/", "http://[::1/"])
def test_cli_bad_cdn_url_exit_2_and_creates_nothing(tmp_path, url):
    r = _run_cli("--out", str(tmp_path / "never"), "--cdn-url", url)
    assert r.returncode == 2 and f"--cdn-url must be an http(s) URL, got {url!r}" in r.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "content",
    ["not json at all", '{"appid": 10}', "[{}]", '[{"appid": null}]', None],
)
def test_cli_main_rejects_bad_input(tmp_path, capsys, content):
    script = _load_script_module()
    apps = tmp_path / "apps.json"
    if content is not None:
        apps.write_text(content)
    out = tmp_path / "never"
    assert script.main(["--apps", str(apps), "--out", str(out), "--no-progress"]) == 2
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra",
    [["--workers", "0"], ["--timeout", "0"], ["--retries", "-1"], ["--cdn-url", "ftp://example.invalid"]],
)
def test_cli_main_rejects_bad_options(tmp_path, extra):
    script = _load_script_module()
    apps = tmp_path / "apps.json"
    apps.write_text('[{"appid": 10, "name": "x"}]')
    out = tmp_path / "never"
    try:
        code = script.main(["--apps", str(apps), "--out", str(out), *extra])
    except SystemExit as exc:  # argparse's own exit for invalid values
        code = exc.code
    assert code == 2
    assert not out.exists()


def test_cli_out_is_a_file(tmp_path, capsys):
    script = _load_script_module()
    apps = tmp_path / "apps.json"
    apps.write_text('[{"appid": 10, "name": "x"}]')
    out = tmp_path / "file"
    out.write_text("x")
    assert script.main(["--apps", str(apps), "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_retry_forever_policy_keeps_its_pause_bounded():
    """The boot fetch retries without end: its pause after thousands of failures is the cap, not an overflow."""
    policy = RetryPolicy(backoff_s=4.0, max_backoff_s=30.0)
    assert all(15.0 <= policy.pause(n) <= 30.0 for n in (10, 1025, 100_000))
