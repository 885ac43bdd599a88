"""Writing an index folder so that it appears all at once, or not at all.

Everything is written into a hidden staging folder beside the target
(``.<index>.staging-<pid>``), fsynced, with ``manifest.json`` last; then the
previous index (if any) is renamed aside, the staging folder renamed into
place, and the previous one deleted. A crash or a full disk while writing
leaves the previous index untouched; a crash between the two renames is
repaired by ``recover`` at the start of the next build, and a failed second
rename puts the previous index back at once. ``replaced`` says whether the
new index is in place, so a caller can report what happened truthfully.
"""

from __future__ import annotations

import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.dino.strategies import Strategy
from core.files import atomic_write_json, fsync_dir, sha256_file

from .layout import FORMAT, FORMAT_VERSION, MANIFEST


def _hidden(out: Path, tag: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.{tag}-*"))


def recover(out: Path) -> str | None:
    """Repair what an interrupted swap left; returns a note about what was done, if anything."""
    note = None
    if not out.exists():
        complete = [p for p in _hidden(out, "staging") if (p / MANIFEST).is_file()]
        olds = _hidden(out, "old")
        if complete:
            os.rename(complete[-1], out)
            note = f"finished the interrupted replacement of {out}"
        elif olds:
            os.rename(olds[-1], out)
            note = f"restored the previous {out} after an interrupted replacement"
    for leftover in [*_hidden(out, "staging"), *_hidden(out, "old")]:
        shutil.rmtree(leftover, ignore_errors=True)
    return note


class IndexWriter:
    """Collects the files of a new index in a staging folder; ``commit`` swaps it into place."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.staging = out.parent / f".{out.name}.staging-{os.getpid()}"
        self.replaced = False  # True once the new index is in place

    def __enter__(self) -> IndexWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging.exists():  # not committed: leave no trace, keep the previous index
            shutil.rmtree(self.staging, ignore_errors=True)

    def write_array(self, rel: str, array: np.ndarray) -> dict:
        """Save an array durably; returns its manifest entry (shape, dtype, sha256)."""
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        return {"shape": list(array.shape), "dtype": array.dtype.name, "sha256": sha256_file(path)}

    def write_json(self, rel: str, obj: object, indent: int | None = None) -> str:
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, obj, indent=indent)
        return sha256_file(path)

    def commit(self, manifest: dict) -> None:
        for folder in [p for p in self.staging.rglob("*") if p.is_dir()]:
            fsync_dir(folder)
        atomic_write_json(self.staging / MANIFEST, manifest, indent=1)
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        had_old = self.out.exists()
        if had_old:
            os.rename(self.out, old)
        try:
            os.rename(self.staging, self.out)
        except OSError:
            if had_old:
                os.rename(old, self.out)
            raise
        self.replaced = True
        fsync_dir(self.out.parent)
        shutil.rmtree(old, ignore_errors=True)


def write_strategy(
    writer: IndexWriter,
    strategy: Strategy,
    embeddings: np.ndarray,
    neighbours: np.ndarray,
    scores: np.ndarray,
    checkpoint: dict,
    **extra: object,
) -> dict:
    """Write one strategy's three arrays; returns its manifest entry (settings, checkpoint, files)."""
    name = strategy.name
    files = {
        "embeddings.npy": writer.write_array(f"{name}/embeddings.npy", embeddings),
        "neighbours.npy": writer.write_array(f"{name}/neighbours.npy", neighbours.astype(np.int32)),
        "scores.npy": writer.write_array(f"{name}/scores.npy", scores.astype(np.float32)),
    }
    return strategy.to_manifest() | {"k": int(neighbours.shape[1]), "checkpoint": checkpoint, **extra, "files": files}


def make_manifest(num_apps: int, apps_sha256: str, dtype: str, strategies: dict, **extra: object) -> dict:
    """The manifest's common part (format, version, time, apps) around the strategies' entries."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_apps": num_apps,
        "apps_sha256": apps_sha256,
        "embeddings_dtype": dtype,
        "strategies": strategies,
        **extra,
    }
