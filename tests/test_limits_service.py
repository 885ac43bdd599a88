"""Hostile input against the real service: gunicorn (2 workers) inside a cgroup v1 memory group.

Every hostile request must get a clear 4xx (or a correct 200), and the group's peak
memory must stay bounded: a regression is stopped by the group's limit (an OOM-killed worker, a
failed test), never by the test machine running out of memory. Skipped where no writable memory
cgroup (v1) is mounted, as in unprivileged containers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import GunicornServer, server_env
from hostile_images import scan_bomb
from test_limits import png, png_header, webp

from devtools.cgroup import MemoryCgroup

pytestmark = pytest.mark.slow

CGROUPS = Path("/sys/fs/cgroup/memory")
LIMIT = 4 * 2**30  # the group's hard limit: what a regression may take before it is killed
PEAK_GROWTH = 600 * 2**20  # what all the hostile uploads together may add to the service's peak


@pytest.fixture(scope="module")
def confined(built_index, tmp_path_factory):
    """The service (Procfile settings, 2 workers) inside a memory group; yields (server, group)."""
    if not (CGROUPS / "cgroup.procs").exists() or not os.access(CGROUPS, os.W_OK):
        pytest.skip("needs a writable cgroup v1 memory hierarchy at /sys/fs/cgroup/memory (root, not a container)")
    group = MemoryCgroup(LIMIT, f"steam-dino-test-{os.getpid()}")
    srv = GunicornServer(server_env(built_index), tmp_path_factory.mktemp("confined") / "gunicorn.log")
    group.add(srv.proc.pid)  # before the master forks its workers (it is still importing)
    try:
        srv.wait_ready()
        yield srv, group
    finally:
        srv.stop()
        group.remove()


def post(url: str, data: bytes, content_type: str = "image/png", path: str = "/match?strategy=SimpleS16"):
    return requests.post(url + path, data=data, headers={"Content-Type": content_type}, timeout=30)


@pytest.mark.slow
def test_tiny_images_that_would_cost_gigabytes_get_a_4xx_with_bounded_memory(confined, built_index):
    srv, group = confined
    warm = (built_index.banners / "30.jpg").read_bytes()
    assert post(srv.url, warm, "image/jpeg").status_code == 200  # one model loaded: the baseline
    group.reset_peak()
    baseline = int((group.path / "memory.usage_in_bytes").read_text())
    hostile = [
        (png(1, 2000), "image/png"),
        (png(1, 10_000), "image/png"),
        (png(1, 40_000), "image/png"),
        (webp(16383, 2), "image/webp"),
        (png_header(1, 1_000_000), "image/png"),
        (png_header(1_000_000, 1), "image/png"),
        (png_header(1, 40_000_000), "image/png"),
    ]
    for data, ctype in hostile:
        r = post(srv.url, data, ctype)
        assert r.status_code == 400 and r.json()["error"]["code"] == "extreme_aspect_ratio", r.text[:300]
        assert "the limit is 20:1" in r.json()["error"]["message"]
    form = requests.post(
        srv.url + "/upload", files={"image": ("tall.png", png_header(1, 1_000_000), "image/png")}, timeout=30
    )
    assert form.status_code == 400 and "aspect ratio" in form.text  # the page, not a 500
    bomb = scan_bomb()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(srv.url, bomb, "image/jpeg"), range(4)))
    for r in answers:
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_much_decoding_work", r.text[:300]
    assert group.oom_kills() == 0
    assert group.peak() - baseline < PEAK_GROWTH, (group.peak() - baseline) / 2**20
    again = post(srv.url, warm, "image/jpeg").json()  # still serving, correctly
    assert again["matches"][0]["appid"] == 30 or again["matches"][0]["score"] > 0.9


@pytest.mark.slow
def test_headers_urls_and_form_parts_over_http(confined):
    srv, _ = confined
    r = requests.get(srv.url + "/match/10?k=5", headers={"Host": "evil.example"}, timeout=10)
    assert r.status_code == 200 and "evil.example" not in r.text
    assert r.headers["X-Frame-Options"] == "DENY" and "frame-ancestors" in r.headers["Content-Security-Policy"]
    page = requests.get(srv.url + "/render/10", headers={"Host": "evil.example"}, timeout=10)
    assert page.status_code == 200 and "evil.example" not in page.text
    parts = {f"f{i}": (None, "x") for i in range(3000)} | {"image": ("a.png", png(8, 8), "image/png")}
    many = requests.post(srv.url + "/match", files=parts, timeout=30)
    assert many.status_code == 413 and many.json()["error"]["code"] == "too_many_form_parts", many.text[:300]
    assert "more than 1000 parts" in many.json()["error"]["message"]
