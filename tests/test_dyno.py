"""The service as a 1 GB dyno runs it: the Procfile's command, default settings, a 1 GiB memory limit.

The whole catalog (29,982 apps, all eight strategies; random embeddings). 16 concurrent uploads on the
default strategy (ComplexB16) spread over both workers, then a few hundred lookups: every answer must be
200 and the kernel's OOM killer must not have killed anything. Memory figures are reported by
``python -m bench.memory`` (``make bench``), not asserted here.
"""

from __future__ import annotations

import http.client
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import background
import pytest
import requests

from core.dino.strategies import ORIGINAL_STRATEGIES
from devtools.cgroup import MemoryCgroup
from devtools.server import GunicornServer as Server
from devtools.server import pin_many
from devtools.workspace import Workspace, banner_jpeg, load_apps

DYNO_BYTES = 2**30
UPLOADS = 16
LOOKUPS = 300

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def catalog_index():
    """The catalog-size index (all 8 strategies, k=100) recording a random ViT-B/16 checkpoint's sha256: a
    ``devtools.workspace.Workspace``, made in the background since the tests were collected (tests/background.py)."""
    run = background.get("dyno_workspace")
    rc, out = run.wait(timeout=600)
    assert rc == 0, out[-4000:]
    ws = Workspace(run.work / "ws")
    return ws, load_apps(ws.index)


@pytest.mark.slow
def test_whole_catalog_fits_a_1gib_dyno(catalog_index, tmp_path):
    why = MemoryCgroup.unavailable()
    if why:
        pytest.skip(f"cannot limit memory like a dyno: {why}")
    ws, apps = catalog_index
    env = {
        "INDEX_DIR": str(ws.index),
        "BANNERS_DIR": str(ws.banners),
        "TORCH_HOME": str(ws.torch_home),
        # default settings but one: 8 uploads queue per worker, and on a loaded machine the last may wait
        # past the default 10 s and get 503 busy by design (test_serving.py); this test is about memory
        "UPLOAD_QUEUE_TIMEOUT": "120",
    }
    with MemoryCgroup(DYNO_BYTES) as cgroup:
        srv = Server(env, tmp_path / "gunicorn.log", cgroup=cgroup)  # the Procfile's command (test_server.py)
        try:
            srv.wait_ready()
            assert "libtorch" in Path(f"/proc/{srv.pid}/maps").read_text()  # imported in the master: shared
            workers = srv.workers(expect=2)
            pinned = pin_many(srv, workers, UPLOADS // 2)
            assert sorted(pinned) == sorted(workers) and all(len(c) == UPLOADS // 2 for c in pinned.values())
            conns = [c for cs in pinned.values() for c in cs]
            with ThreadPoolExecutor(UPLOADS) as pool:
                statuses = list(pool.map(_upload, conns, range(UPLOADS)))
            assert statuses == [200] * UPLOADS, srv.output()[-3000:]
            for c in conns:
                c.close()
            for pid in workers:  # both embedded with the weights mapped from the checkpoint file, not copied
                assert "dino_vitbase16_pretrain.pth" in Path(f"/proc/{pid}/maps").read_text()
            rng = random.Random(0)
            with requests.Session() as http:
                for i in range(LOOKUPS):
                    strategy = ORIGINAL_STRATEGIES[i % len(ORIGINAL_STRATEGIES)]
                    r = http.get(f"{srv.url}/match/{rng.choice(apps)['appid']}?strategy={strategy}", timeout=60)
                    assert r.status_code == 200, r.text[:300]
            assert srv.workers() == workers, "a worker was replaced (killed?)"
            assert cgroup.oom_kills() == 0, srv.output()[-3000:]
        finally:
            srv.stop()


def _upload(conn: http.client.HTTPConnection, seed: int) -> int:
    conn.request(
        "POST", "/match?strategy=ComplexB16&k=10", body=banner_jpeg(seed), headers={"Content-Type": "image/jpeg"}
    )
    r = conn.getresponse()
    r.read()
    return r.status
