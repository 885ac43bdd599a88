"""Hostile and worst-case uploads against the service as a 1 GB dyno runs it.

The Procfile's command with default settings, 2 workers, the whole catalog (test_dyno.py's workspace),
in a 1 GiB memory group. Each class of small file that would cost seconds or gigabytes gets its 4xx
within 2 s (an honest image its 200, decoded within 2 s) while lookups keep flowing; the costliest
image of each format adds at most about the README's figure to the group's peak; two of them at
once, one per worker, cause no OOM kill.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import background
import pytest
import requests
from hostile_images import (
    animated_webp,
    apng_header,
    bmp_rle8,
    encode,
    gif_canvas,
    junk_before_scans,
    mpo,
    scan_bomb,
    worst_of_each_format,
)
from PIL import Image

from devtools.cgroup import MemoryCgroup
from devtools.clients import parse_server_timing
from devtools.server import GunicornServer as Server
from devtools.server import decoders, pin_many
from devtools.workspace import Workspace, banner_jpeg, load_apps, make_banner

pytestmark = pytest.mark.slow

DYNO_BYTES = 2**30
PER_UPLOAD_MIB = (
    220  # README, "Uploads and their limits": "at most about 200 MiB" per upload at the default MAX_IMAGE_PIXELS
)


@pytest.fixture(scope="module")
def dyno(tmp_path_factory):
    """(server, memory group, apps): the service over the whole catalog in a 1 GiB group."""
    why = MemoryCgroup.unavailable()
    if why:
        pytest.skip(f"cannot limit memory like a dyno: {why}")
    run = background.get("dyno_workspace")
    rc, out = run.wait(timeout=600)
    assert rc == 0, out[-4000:]
    ws = Workspace(run.work / "ws")
    env = {"INDEX_DIR": str(ws.index), "BANNERS_DIR": str(ws.banners), "TORCH_HOME": str(ws.torch_home)}
    with MemoryCgroup(DYNO_BYTES) as cgroup:
        srv = Server(env, tmp_path_factory.mktemp("dyno") / "gunicorn.log", cgroup=cgroup)
        try:
            srv.wait_ready()
            for conn in _each_worker(srv):  # each worker loads the model: what follows is the uploads' own cost
                assert _post(conn, banner_jpeg(0))[0] == 200
                conn.close()
            yield srv, cgroup, load_apps(ws.index)
        finally:
            srv.stop()


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, dict, float]:
    """(status, JSON answer, seconds) of an upload on this connection; a 200's seconds are its decoding and
    preprocessing (Server-Timing), the file's own cost: the model pass is the same for any file."""
    start = time.monotonic()
    conn.request("POST", "/match?k=10", body=body, headers={"Content-Type": "image/png"})
    r = conn.getresponse()
    answer = json.loads(r.read())
    timing = parse_server_timing(r.getheader("Server-Timing"))
    seconds = (timing["decode"] + timing["preprocess"]) / 1000 if r.status == 200 else time.monotonic() - start
    return r.status, answer, seconds


def _each_worker(srv: Server) -> list[http.client.HTTPConnection]:
    """A fresh keep-alive connection held by each worker (idle ones are closed by the server)."""
    return [conns[0] for conns in pin_many(srv, srv.workers(expect=2), 1).values()]


@pytest.fixture(scope="module")
def hostile() -> dict[str, tuple[bytes, int, str | None]]:
    """name: (bytes, status, error code)"""
    return {
        "JPEG scans behind junk bytes": (scan_bomb(junk=b"\x00"), 400, "too_much_decoding_work"),
        "JPEG scans with junk between them": (scan_bomb(junk=b"\xab", junk_first=False), 400, "too_much_decoding_work"),
        "JPEG scans behind fill bytes": (scan_bomb(junk=b"\xff\xff\xff"), 400, "too_much_decoding_work"),
        "MPO scan bomb": (mpo((4000, 4000), scans=5000), 400, "too_much_decoding_work"),
        "TIFF of JPEG strips": (encode(Image.new("RGB", (800, 800)), "TIFF", compression="jpeg"), 400, "not_an_image"),
        "animated WebP, 94 bytes": (animated_webp(16383, 16383, frames=1), 400, "too_many_pixels"),
        "animated WebP, 1x1 frames": (animated_webp(6000, 6600), 400, "too_many_pixels"),
        "GIF canvas over the cap": (gif_canvas(7000, 7000, frames=1000), 400, "too_many_pixels"),
        "APNG canvas over the cap": (apng_header(7000, 7000), 400, "too_many_pixels"),
        "honest GIF, 1000 frames": (gif_canvas(2000, 2000, frames=1000), 200, None),
        "honest MPO": (mpo((600, 900)), 200, None),
        "honest progressive JPEG, junk before its scans": (
            junk_before_scans(encode(make_banner(1), "JPEG", progressive=True)),
            200,
            None,
        ),
    }


def test_each_class_gets_its_answer_within_2_s_while_lookups_flow(dyno, hostile):
    srv, cgroup, apps = dyno
    lookups, stop = [], threading.Event()

    def look_up():
        with requests.Session() as http:
            i = 0
            while not stop.is_set():
                start = time.monotonic()
                r = http.get(f"{srv.url}/match/{apps[i % len(apps)]['appid']}", timeout=10)
                lookups.append((r.status_code, time.monotonic() - start))
                i += 7919

    looker = threading.Thread(target=look_up)
    looker.start()
    failures = []
    try:
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
        for name, (body, status, code) in hostile.items():
            got, answer, seconds = _post(conn, body)
            got_code = answer["error"]["code"] if "error" in answer else None
            if (got, got_code) != (status, code) or seconds > 2.0:
                failures.append(f"{name}: {got} {got_code} in {seconds:.2f} s ({answer})")
    finally:
        stop.set()
        looker.join()
    assert not failures, "\n".join(failures)
    assert lookups and all(status == 200 for status, _ in lookups), lookups[:10]
    assert max(seconds for _, seconds in lookups) < 1.0, sorted(s for _, s in lookups)[-5:]
    log = srv.output()
    assert "Traceback" not in log and "PIL." not in log and "Warning" not in log, log[-3000:]
    assert cgroup.oom_kills() == 0


def test_the_master_forks_the_decoders_not_the_workers(dyno):
    """A fork stalls every thread of the forking process: a worker's lookups would wait for it."""
    srv, _, _ = dyno
    conn = _each_worker(srv)[0]
    service, parents = {srv.pid, *srv.workers()}, set()
    with ThreadPoolExecutor(1) as pool:
        upload = pool.submit(_post, conn, bmp_rle8(2000, 2000, run=1))  # seconds of decoding
        while not upload.done():
            parents |= {pid for pid in service if decoders(pid)}
    assert upload.result()[0] == 200 and parents == {srv.pid}, (parents, srv.workers())


@pytest.fixture(scope="module")
def worst():
    return worst_of_each_format()


def test_each_formats_costliest_upload_stays_within_the_memory_figure(dyno, worst):
    srv, cgroup, _ = dyno
    conn = _each_worker(srv)[0]
    peaks, failures = {}, []
    for name, body in worst.items():
        time.sleep(0.5)  # the previous child's memory is freed
        baseline = int((cgroup.path / "memory.usage_in_bytes").read_text())
        cgroup.reset_peak()
        status, answer, _ = _post(conn, body)
        peaks[name] = (cgroup.peak() - baseline) / 2**20
        expected = 400 if name == "TIFF" else 200
        if status != expected or peaks[name] > PER_UPLOAD_MIB:
            failures.append(f"{name}: {status} {answer.get('error')}, +{peaks[name]:.0f} MiB")
    print("peak memory per upload (MiB):", {name: round(mib) for name, mib in peaks.items()})
    assert not failures, "\n".join(failures)
    assert cgroup.oom_kills() == 0


def test_two_costliest_uploads_at_once_fit_the_1gib_dyno(dyno, worst):
    srv, cgroup, _ = dyno
    workers = srv.workers(expect=2)
    cgroup.reset_peak()
    for name, body in worst.items():
        conns = _each_worker(srv)
        with ThreadPoolExecutor(2) as pool:
            statuses = [status for status, _, _ in pool.map(_post, conns, [body] * 2)]
        assert statuses == [400 if name == "TIFF" else 200] * 2, (name, statuses, srv.output()[-2000:])
        for c in conns:
            c.close()
    print(f"two at once: the group's peak is {cgroup.peak() / 2**20:.0f} MiB of {DYNO_BYTES / 2**20:.0f}")
    assert cgroup.oom_kills() == 0 and srv.workers() == workers, srv.output()[-3000:]
