"""Operator traps: a full disk, a builder killed with its decoding children alive, --out
through a symlink, broken files and settings: each reported truthfully, in one line, losing nothing."""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, make_catalog

from core.cpu import pid_alive
from core.dino.strategies import parse_strategies
from indexer.build import BuildConfig, BuildFailed, build_index
from indexer.cache import BuildLocked, EmbeddingCache


def arrays(index: Path) -> dict[str, bytes]:
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*.npy"))}


@pytest.fixture
def small_build(tmp_path, install_checkpoints):
    """A 5-banner SimpleS16 index at tmp_path/index, built once; returns its BuildConfig."""
    install_checkpoints("S16")
    make_catalog(tmp_path / "banners", 5)
    cfg = BuildConfig(
        images=tmp_path / "banners",
        out=tmp_path / "index",
        strategies=parse_strategies("SimpleS16"),
        k=2,
        progress=False,
    )
    build_index(cfg)
    return cfg


@pytest.mark.slow
def test_disk_full_is_said_in_words_and_the_previous_index_reported_truthfully(small_build, monkeypatch):
    cfg = small_build
    before = arrays(cfg.out)
    make_catalog(cfg.images, 6)  # one more banner: the next build writes new tables
    real_write = np.lib.format.write_array

    def short_write(fp, array, **kw):  # what numpy says on a full disk: no errno, no words
        raise OSError(f"{array.nbytes} requested and 88000 written")

    monkeypatch.setattr(np.lib.format, "write_array", short_write)
    with pytest.raises(BuildFailed) as e:
        build_index(cfg)
    assert "no space left on device" in str(e.value) and f"The index at {cfg.out} is unchanged" in str(e.value)
    assert arrays(cfg.out) == before and not list(cfg.out.parent.glob(".index.staging-*"))
    monkeypatch.setattr(np.lib.format, "write_array", real_write)

    def full(self):  # the disk fills up after the swap, while the cache is merged
        raise OSError(errno.ENOSPC, "No space left on device", str(self.store / "x.npz"))

    monkeypatch.setattr(EmbeddingCache, "consolidate", full)
    summary = build_index(cfg)  # the index was written: that is a success, with the truth in a note
    assert summary.rows == 6 and arrays(cfg.out) != before
    assert any("new index is in place" in n and "no space left on device" in n for n in summary.notes)


LOCK_HOLDER = """
import os, sys, time
from pathlib import Path
from indexer.cache import EmbeddingCache
if sys.argv[2] == "die":
    from core.dino.extract import die_with_parent
EmbeddingCache(Path(sys.argv[1])).__enter__()
parent = os.getpid()
ready, signal_ready = os.pipe()
child = os.fork()
if child == 0:  # a decoding worker: forked after the lock was taken, it shares the lock file's descriptor
    if sys.argv[2] == "die":
        die_with_parent(parent)  # what the DataLoader runs first in each worker
    os.write(signal_ready, b"1")
    time.sleep(60)
    os._exit(0)
os.read(ready, 1)
print(child, flush=True)
time.sleep(60)
"""


def _hold_lock_then_kill(work: Path, mode: str) -> int:
    """Start a process that holds the build lock and has a child; kill -9 it; returns the child's pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(work), mode], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    child = int(holder.stdout.readline())
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    holder.stdout.close()
    return child


def test_build_lock_is_released_when_the_builder_dies_even_with_children_alive(tmp_path):
    work = tmp_path / ".index.work"
    child = _hold_lock_then_kill(work, "live")
    try:
        assert pid_alive(child)  # the orphan still has the lock file open
        with EmbeddingCache(work):  # yet the lock is free at once: it was the killed process's own
            pass
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.slow  # imports torch in the child
def test_decoding_workers_die_with_the_builder(tmp_path):
    child = _hold_lock_then_kill(tmp_path / ".index.work", "die")
    deadline = time.monotonic() + 20
    while pid_alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the decoding worker outlived its builder")


def test_a_second_build_through_a_symlink_waits_for_the_first(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real / "index")
    make_catalog(tmp_path / "banners", 3)
    cfg = BuildConfig(
        images=tmp_path / "banners", out=tmp_path / "link", strategies=parse_strategies("SimpleS16"), progress=False
    )
    with EmbeddingCache(real / ".index.work"), pytest.raises(BuildLocked):  # a build given the real path
        build_index(cfg)


@pytest.mark.slow
def test_out_through_a_symlink_writes_the_target_and_keeps_the_link(small_build, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(small_build.out)
    make_catalog(small_build.images, 6)
    summary = build_index(dataclasses.replace(small_build, out=link))
    assert summary.rows == 6 and summary.out == small_build.out
    assert link.is_symlink() and (link / "manifest.json").is_file()
    assert not [p.name for p in tmp_path.iterdir() if ".old-" in p.name or ".staging-" in p.name]


def test_unreadable_cache_files_are_skipped_with_a_warning(tmp_path, capsys):
    work = tmp_path / ".index.work"
    (work / "chunks").mkdir(parents=True)
    (work / "store").mkdir()
    (work / "chunks" / "empty.npz").write_bytes(b"")
    (work / "store" / "failed.json").write_text("[1, 2")
    with EmbeddingCache(work) as cache:
        assert cache.vectors == {} and cache.failed == {}
    err = capsys.readouterr().err
    assert "ignoring unreadable cache file" in err and "empty.npz" in err and "failed.json" in err


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        *((name, "a whole number of at least 1") for name in ("GUNICORN_TIMEOUT", "PORT", "WEB_CONCURRENCY")),
        ("TORCH_THREADS", "a whole number of at least 0"),
        ("MALLOC_ARENA_MAX", "a whole number of at least 1"),
        ("LOG_LEVEL", "one of debug, info, warning, error, critical"),
    ],
)
def test_bad_gunicorn_settings_stop_with_one_line(name, expected):
    """The Procfile's command checks them before gunicorn, which parses WEB_CONCURRENCY as it is imported."""
    env = {**os.environ, name: "abc"}
    r = subprocess.run(
        [sys.executable, "-m", "serving.launch"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"error: cannot start: {name}='abc': expected {expected}"
