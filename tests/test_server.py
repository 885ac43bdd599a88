"""The real service under gunicorn, over HTTP on 127.0.0.1: endpoints, errors, and the pages in Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from browser import HEADLESS_FLAGS, Chromium, find_chromium
from conftest import ROOT, GunicornServer, server_env
from PIL import Image, ImageChops, ImageStat

pytestmark = pytest.mark.slow  # the real gunicorn service: seconds to start and stop


def apps_of(built):
    return json.loads((built.index / "apps.json").read_text())


@pytest.mark.slow
def test_starts_quickly_with_two_workers(server):
    assert server.startup_s < 60  # to the first 200 from /health: both workers serving
    assert len(server.workers(expect=2)) == 2
    h = requests.get(server.url + "/health", timeout=5).json()
    assert h["status"] == "ok" and h["apps"] == 24


def test_every_endpoint(server, built_index):
    apps = apps_of(built_index)
    nbr = np.load(built_index.index / "ComplexB16" / "neighbours.npy")
    sco = np.load(built_index.index / "ComplexB16" / "scores.npy")
    with requests.Session() as http:
        for row, app in enumerate(apps):
            body = http.get(f"{server.url}/match/{app['appid']}", params={"k": 10}, timeout=10).json()
            assert [m["appid"] for m in body["matches"]] == [apps[i]["appid"] for i in nbr[row]]
            np.testing.assert_allclose([m["score"] for m in body["matches"]], sco[row], atol=1e-6)
        assert http.get(f"{server.url}/strategies", timeout=5).json()["default"] == "ComplexB16"
        assert http.get(f"{server.url}/apps/20", timeout=5).json()["name"] == "STAR WARS™ Battlefront"
        assert http.get(f"{server.url}/apps", params={"q": "pokémon"}, timeout=5).json()["results"][0]["appid"] == 10
        assert len(http.get(f"{server.url}/unique", params={"n": 4}, timeout=5).json()["games"]) == 4
        assert http.get(f"{server.url}/compare/10", params={"k": 3}, timeout=5).json()["k"] == 3
        compare_page = http.get(f"{server.url}/compare/10", headers={"Accept": "text/html"}, timeout=5)
        assert compare_page.headers["Content-Type"].startswith("text/html")
        assert compare_page.text.count('class="compare-row"') == 3 and "Overlap of the top" in compare_page.text
        page = http.get(f"{server.url}/render/10", timeout=5)
        assert page.status_code == 200 and "Pokémon Quest" in page.text
        assert http.get(f"{server.url}/", timeout=5).status_code == 200
        img = http.get(f"{server.url}/banners/10.jpg", timeout=5)
        assert img.status_code == 200 and img.content == (built_index.banners / "10.jpg").read_bytes()
        css = http.get(f"{server.url}/static/style.css", timeout=5)
        assert css.status_code == 200 and "grid" in css.text


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "status", "code"),
    [
        ("get", "/match/abc", {}, 400, "bad_appid"),
        ("get", "/match/424242", {}, 404, "unknown_appid"),
        ("get", "/match/10?k=500", {}, 400, "bad_parameter"),
        ("get", "/match/10?strategy=nope", {}, 400, "unknown_strategy"),
        ("post", "/match", {"data": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type"),
        ("post", "/match", {"data": b"not an image", "headers": {"Content-Type": "image/png"}}, 400, "not_an_image"),
        ("post", "/match", {"files": {"picture": ("a.jpg", b"x")}}, 400, "missing_image"),
        ("put", "/match/10", {}, 405, "method_not_allowed"),
        ("get", "/no/such/thing", {}, 404, "not_found"),
    ],
)
def test_error_codes_over_http(server, method, path, kwargs, status, code):
    r = getattr(requests, method)(server.url + path, timeout=10, **kwargs)
    assert r.status_code == status
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json()["error"]["code"] == code


@pytest.mark.slow
def test_uploaded_indexed_banner_finds_itself(server, built_index):
    for appid, strategy in zip((10, 130, 240), built_index.strategies, strict=True):  # each strategy once
        data = (built_index.banners / f"{appid}.jpg").read_bytes()
        r = requests.post(
            f"{server.url}/match",
            params={"strategy": strategy, "k": 3},
            files={"image": ("b.jpg", data)},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        best = r.json()["matches"][0]
        assert best["appid"] == appid and best["score"] > 0.998
    raw = requests.post(
        f"{server.url}/match",
        data=(built_index.banners / "50.jpg").read_bytes(),
        headers={"Content-Type": "image/jpeg"},
        timeout=60,
    )
    assert raw.json()["matches"][0]["appid"] == 50


def _screenshot(url: str, out, images: bool = True) -> Image.Image:
    flags = [
        *HEADLESS_FLAGS,
        f"--user-data-dir={out.parent / ('profile-' + out.stem)}",
        "--window-size=1280,1400",
        f"--screenshot={out}",
        "--virtual-time-budget=5000",
    ]
    if not images:
        flags.append("--blink-settings=imagesEnabled=false")
    for _attempt in range(3):  # a loaded machine can make Chromium give up on its first start
        run = subprocess.run([find_chromium(), *flags, url], capture_output=True, text=True, timeout=180, check=False)
        if out.exists():
            break
    assert out.exists(), f"Chromium wrote no screenshot of {url}: {run.returncode} {run.stderr[-2000:]}"
    return Image.open(out).convert("RGB")


@pytest.mark.slow
@pytest.mark.skipif(
    find_chromium() is None and not os.environ.get("REQUIRE_CHROMIUM"),
    reason="Chromium is not installed (.ci/run installs it and sets REQUIRE_CHROMIUM=1)",
)
def test_gallery_renders_in_headless_chromium(server, built_index, tmp_path):
    url = f"{server.url}/render/10?strategy=ComplexB16&k=8"
    with_images = _screenshot(url, tmp_path / "gallery.png")
    without = _screenshot(url, tmp_path / "gallery-noimages.png", images=False)
    assert with_images.size == (1280, 1400)
    # The page itself (text, layout) is there without images too; the banners make the difference.
    diff = ImageChops.difference(with_images, without).convert("L").point(lambda v: 255 if v > 40 else 0)
    changed = ImageStat.Stat(diff).mean[0] / 255
    assert changed > 0.10, f"only {changed:.1%} of the page changed when banners load"
    # The query banner sits top left, beside the title: its own pixels must be on screen.
    query = Image.open(built_index.banners / "10.jpg").convert("RGB").resize((200, 300))
    crop = with_images.crop((24, 40, 24 + 260, 40 + 420))
    q_colour = np.asarray(query).reshape(-1, 3).mean(0)
    near = np.abs(np.asarray(crop).reshape(-1, 3).astype(int) - q_colour).sum(1) < 60
    assert near.mean() > 0.05, "the query banner is not visible at the top left"
    # And as many match cards as asked, each with a loaded banner (the no-image render lacks them).
    html = requests.get(url, timeout=10).text
    assert html.count('class="card"') == 8
    if os.environ.get("SCREENSHOT_DIR"):  # keep the picture for people to look at
        shutil.copy(tmp_path / "gallery.png", os.path.join(os.environ["SCREENSHOT_DIR"], "gallery.png"))


WIDTHS = {390: 844, 1280: 900}  # an iPhone 12-15's CSS viewport; a laptop's

# What the page measures, and which elements stick out past the viewport when it overflows.
MEASURE = """JSON.stringify({
  path: location.pathname + location.search,
  type: document.contentType,
  h1: (document.querySelector('h1') || {}).textContent,
  scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth,
  wide: [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .slice(0, 8).map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right)),
})"""


def _pages(base: str) -> dict[str, str]:
    return {
        "home": f"{base}/",
        "search": f"{base}/?q=portal",
        "gallery": f"{base}/render/10",
        "gallery-show-more": f"{base}/render/20?strategy=SimpleS16&k=4",
        "compare": f"{base}/compare/10",
        "gallery-attention": f"{base}/render/10?attention=1",
        "pair": f"{base}/pair/10/20",
        "random": f"{base}/random",
        "error-unknown-appid": f"{base}/render/999999",
        "error-unknown-url": f"{base}/no/such/page",
    }


@pytest.mark.slow
@pytest.mark.skipif(
    find_chromium() is None and not os.environ.get("REQUIRE_CHROMIUM"),
    reason="Chromium is not installed (.ci/run installs it and sets REQUIRE_CHROMIUM=1)",
)
def test_no_page_is_wider_than_the_screen(server, built_index, tmp_path):
    shots = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    measured = {}
    with Chromium(tmp_path / "profile") as page:
        for width, height in WIDTHS.items():
            page.viewport(width, height)
            for name, url in _pages(server.url).items():
                page.goto(url)
                measured[width, name] = json.loads(page.evaluate(MEASURE))
                page.screenshot(shots / f"{name}-{width}.png")
            page.goto(server.url + "/")
            page.submit_with_file(".upload form", built_index.banners / "20.jpg", {"strategy": "SimpleS16"})
            measured[width, "upload"] = json.loads(page.evaluate(MEASURE))
            page.screenshot(shots / f"upload-{width}.png")

    for (width, name), m in measured.items():
        assert m["type"] == "text/html", (width, name, m)
        assert m["innerWidth"] == width, (width, name, m)
        assert m["scrollWidth"] <= width, f"{name} at {width} px is {m['scrollWidth']} px wide: {m}"
    # The pages are what they claim: errors as HTML for a browser, the random game's gallery, the upload's.
    assert measured[390, "error-unknown-url"]["h1"].startswith("404")
    assert measured[390, "error-unknown-appid"]["h1"].startswith("404")
    assert measured[390, "random"]["path"].startswith("/render/")
    assert measured[390, "upload"]["h1"] == "Your image"


def test_refuses_to_start_without_an_index(tmp_path):
    srv = GunicornServer({"INDEX_DIR": str(tmp_path / "missing"), "TORCH_HOME": str(tmp_path)}, tmp_path / "log")
    try:
        assert srv.proc.wait(timeout=60) == 3
        out = srv.output()
        assert "cannot start" in out and "no index folder here" in out and "Traceback" not in out
    finally:
        srv.stop()


def test_procfile_and_docker_use_the_same_entry_point():
    procfile = (ROOT / "Procfile").read_text()
    assert procfile.strip() == "web: python -m serving.launch"  # what GunicornServer runs (devtools/server.py)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'CMD ["python", "-m", "serving.launch"]' in dockerfile
    assert "pip install -r requirements.txt" in dockerfile and "USER " in dockerfile  # CPU torch: requirements.txt
    assert "download.pytorch.org/whl/cpu" in (ROOT / "requirements.txt").read_text()


@pytest.mark.slow
def test_serves_with_env_from_heroku_like_host(built_index, tmp_path):
    """PORT and WEB_CONCURRENCY from the environment, as a Heroku-like platform sets them; torch is imported
    by the master before forking, so the worker shares it."""
    env = server_env(built_index, WEB_CONCURRENCY="1", INDEX_VERIFY="quick", PRELOAD_MODELS="simples16")
    srv = GunicornServer(env, tmp_path / "log")
    try:
        assert srv.wait_ready() < 60
        assert "libtorch" in Path(f"/proc/{srv.pid}/maps").read_text()
        assert requests.get(f"{srv.url}/match/10", timeout=5).status_code == 200
        # PRELOAD_MODELS (names as for ?strategy=): the worker loaded ViT-S/16 before serving; an unknown
        # name stops start-up instead (test_limits.py)
        assert requests.get(f"{srv.url}/health", timeout=5).json()["models_loaded"] == ["S16"]
    finally:
        srv.stop()


def test_gunicorn_hooks_leave_the_start_up_heap_out_of_garbage_collection(tmp_path):
    """when_ready (master, before forking) and post_worker_init freeze what start-up made, so that a full
    collection never walks the catalog and torch's modules while requests wait."""
    code = (
        "import gc, runpy, types; conf = runpy.run_path('gunicorn.conf.py'); "
        "conf['when_ready'](None); a = gc.get_freeze_count(); "
        "conf['post_worker_init'](types.SimpleNamespace(wsgi=types.SimpleNamespace(extensions={}))); "
        "print(a, gc.get_freeze_count())"
    )
    env = {**os.environ, "PORT": "8000", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    master, worker = map(int, r.stdout.split())
    assert master > 1000 and worker >= master
