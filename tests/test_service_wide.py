"""Facts that must hold for the whole gunicorn service, not one worker: metrics, /health, the rate limit."""

from __future__ import annotations

import io
import shutil
import socket
import subprocess
import time

import pytest
import requests
from conftest import GunicornServer, free_port, server_env
from PIL import Image


def _fresh(method: str, url: str, **kw) -> requests.Response:
    """One request on its own connection, so that successive ones spread over the workers."""
    headers = {"Connection": "close", **kw.pop("headers", {})}
    with requests.Session() as s:
        return s.request(method, url, headers=headers, timeout=30, **kw)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (60, 90), "teal").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_metrics_and_health_cover_every_worker(server):
    pids = server.workers(expect=2)
    assert len(pids) == 2
    for _ in range(30):
        assert _fresh("GET", server.url + "/match/10?k=2").status_code == 200
    text = _fresh("GET", server.url + "/metrics").text
    line = next(x for x in text.splitlines() if x.startswith('http_request_duration_seconds_count{endpoint="/match'))
    assert float(line.split()[-1]) >= 30  # merged: whichever worker answered, every request counts
    assert "index_apps 24.0" in text and "index_build_info{" in text

    up = _fresh(
        "POST", server.url + "/match?strategy=SimpleS16&k=2", data=_png(), headers={"Content-Type": "image/png"}
    )
    assert up.status_code == 200, up.text
    # one worker loaded S16; /health says so whichever worker answers
    answers = [_fresh("GET", server.url + "/health").json() for _ in range(12)]
    assert all(a["models_loaded"] == ["S16"] for a in answers), answers
    assert all(a["models_loaded_workers"]["S16"] >= 1 for a in answers)
    text = _fresh("GET", server.url + "/metrics").text
    assert 'upload_stage_seconds_count{stage="forward",strategy="SimpleS16"} 1.0' in text


def _start_redis(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install -y redis-server): the exact limit is untested")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail("redis-server did not start")


@pytest.mark.slow
def test_rate_limit_is_exact_across_workers_with_redis(built_index, tmp_path):
    redis_proc, port = _start_redis(tmp_path)
    env = server_env(built_index, UPLOAD_RATE_LIMIT="2/minute", RATE_LIMIT_STORAGE_URI=f"redis://127.0.0.1:{port}")
    srv = GunicornServer(env, tmp_path / "gunicorn.log")
    try:
        srv.wait_ready()
        assert len(srv.workers(expect=2)) == 2
        codes = [
            _fresh("POST", srv.url + "/match", data=b"junk", headers={"Content-Type": "image/png"}).status_code
            for _ in range(6)
        ]
        assert codes[:2] == [400, 400] and codes[2:] == [429] * 4, codes  # 2 in all, not 2 per worker
        assert _fresh("GET", srv.url + "/match/10").status_code == 200  # lookups are not limited
    finally:
        srv.stop()
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
