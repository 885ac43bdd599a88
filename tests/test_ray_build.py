"""The builder's embedding pass on a local Ray instance (--ray): the local build's index, bit for bit, through
a killed worker and a killed driver. CI runs these by their own command (make test-ray)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, arrays_of, kill_after_chunks, make_banner, make_catalog

from indexer.cli import build_index as build_index_cli

pytestmark = [pytest.mark.slow, pytest.mark.ray]

STRATEGIES = "SimpleS16,ComplexS16,ComplexB16"


@pytest.fixture(scope="module")
def workers_torch_home(tmp_path_factory, checkpoint_store) -> Path:
    """A local Ray instance of 2 CPUs whose workers' TORCH_HOME holds another ViT-S/16 than the tests' own."""
    import ray  # here, not at collection: make test collects this module and skips it

    home = tmp_path_factory.mktemp("workers_torch_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    other = checkpoint_store("S16", seed=1)
    os.symlink(other, home / "hub" / "checkpoints" / other.name)
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TORCH_HOME": str(home)}})
    yield home
    ray.shutdown()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, checkpoint_store, workers_torch_home) -> tuple[list[str], Path]:
    """Banners (two of them unreadable), the build options, and the local build's index with those options."""
    root = tmp_path_factory.mktemp("ray_catalog")
    make_catalog(root / "banners", 12)
    (root / "banners" / "5.jpg").write_bytes(b"<html>not a banner</html>")
    good = (root / "banners" / "10.jpg").read_bytes()
    (root / "banners" / "7.jpg").write_bytes(good[: len(good) // 3])
    common = ["--images", str(root / "banners"), "--strategies", STRATEGIES, "--k", "5", "--batch-size", "2"]
    common += ["--threads", "1", "--quiet"]
    common += [f"--weights={code}={checkpoint_store(code)}" for code in ("S16", "B16")]
    threads = torch.get_num_threads()
    try:
        assert build_index_cli.main([*common, "--out", str(root / "local")]) == 0
    finally:
        torch.set_num_threads(threads)
    return common, root / "local"


def manifest_entries(index: Path) -> tuple[dict, list]:
    manifest = json.loads((index / "manifest.json").read_text())
    return manifest["strategies"], manifest["skipped_images"]


def test_ray_build_equals_the_local_build(catalog, tmp_path, run_main):
    common, local = catalog
    r = run_main(build_index_cli.main, *common, "--out", str(tmp_path / "index"), "--ray")
    assert r.returncode == 0, r.stderr
    assert "12 images (12 embedded, 0 reused, 2 skipped)" in r.stdout
    assert "forwards S16 (all actors)" in r.stdout and "forwards B16 (all actors)" in r.stdout
    assert arrays_of(tmp_path / "index") == arrays_of(local)
    assert manifest_entries(tmp_path / "index") == manifest_entries(local)


def ray_actor_pids() -> list[int]:
    """Processes of Ray Data's model actors (their title is ray::MapWorker(...))."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::MapWorker"):
                pids.append(int(proc.name))
        except OSError:  # the process ended meanwhile
            pass
    return pids


def test_a_killed_ray_worker_changes_nothing(catalog, tmp_path, run_main):
    common, local = catalog
    chunks, killed = tmp_path / ".index.work" / "chunks", []

    def kill_an_actor_once_a_batch_is_written() -> None:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline:
            pids = ray_actor_pids() if any(chunks.glob("*.npz")) else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.01)

    killer = threading.Thread(target=kill_an_actor_once_a_batch_is_written, daemon=True)
    killer.start()
    r = run_main(build_index_cli.main, *common, "--out", str(tmp_path / "index"), "--ray")
    killer.join(timeout=1)
    assert killed, "no Ray actor was killed while the build ran"
    assert r.returncode == 0, r.stderr
    assert arrays_of(tmp_path / "index") == arrays_of(local)


def test_each_actor_checks_its_nodes_checkpoint(workers_torch_home, tmp_path, install_checkpoints, run_main):
    """Without --weights, the actors resolve the checkpoint in their own TORCH_HOME: another file there is refused."""
    install_checkpoints("S16")
    make_catalog(tmp_path / "banners", 3)
    r = run_main(
        build_index_cli.main,
        *["--images", str(tmp_path / "banners"), "--out", str(tmp_path / "index")],
        *["--strategies", "SimpleS16", "--quiet", "--ray"],
    )
    assert r.returncode == 1
    assert "error:" in r.stderr and "sha256" in r.stderr and "dino_deitsmall16_pretrain.pth" in r.stderr
    assert not (tmp_path / "index").exists()


def test_a_killed_driver_resumes_from_the_work_folder(tmp_path, install_checkpoints, workers_torch_home, run_main):
    """The driver starts its own local instance (its workers find the checkpoint in the driver's TORCH_HOME)."""
    checkpoint = install_checkpoints("S16")["S16"]
    make_catalog(tmp_path / "banners", 12)
    make_banner(tmp_path / "banners" / "5.jpg", seed=5)
    common = ["--images", str(tmp_path / "banners"), "--strategies", "SimpleS16", "--k", "4", "--batch-size", "1"]
    common += ["--threads", "1", "--quiet"]
    out, chunks = tmp_path / "index", tmp_path / ".index.work" / "chunks"
    driver = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "build_index.py"), *common, "--out", str(out), "--ray"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its Ray processes too, to end them after the test
    )
    try:
        kill_after_chunks(driver, chunks, timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
    done = len(list(chunks.glob("*.npz")))
    assert 3 <= done < 13 and not out.exists()

    weights = f"--weights={checkpoint}"  # this process's Ray workers look in another TORCH_HOME
    resumed = run_main(build_index_cli.main, *common, weights, "--out", str(out), "--ray")
    assert resumed.returncode == 0, resumed.stderr
    embedded = int(resumed.stdout.split("(")[1].split(" embedded")[0])
    assert embedded <= 13 - done
    threads = torch.get_num_threads()
    try:
        local = run_main(build_index_cli.main, *common, "--out", str(tmp_path / "local"))
    finally:
        torch.set_num_threads(threads)
    assert local.returncode == 0, local.stderr
    assert arrays_of(out) == arrays_of(tmp_path / "local")


def test_the_service_and_the_local_build_never_import_ray():
    code = "import sys, app, serving.launch, indexer.build, indexer.cli.build_index; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_more_workers_than_the_cluster_holds_is_refused_before_anything_is_written(catalog, tmp_path, run_main):
    common, _ = catalog
    r = run_main(build_index_cli.main, *common, "--out", str(tmp_path / "index"), "--ray", "--workers", "5")
    assert r.returncode == 2
    assert "--workers 5: the Ray cluster has 0 GPUs and 2 CPUs" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_malformed_address_is_one_line(tmp_path, install_checkpoints):
    """In a process of its own: this one's Ray session, which other tests start, is joined whatever the address."""
    install_checkpoints("S16")
    make_catalog(tmp_path / "banners", 3)
    argv = ["--images", tmp_path / "banners", "--out", tmp_path / "index", "--strategies", "SimpleS16", "--quiet"]
    r = subprocess.run(
        [sys.executable, "-m", "indexer.cli.build_index", *map(str, argv), "--ray", "nonsense-address"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: --ray nonsense-address"), r.stderr
