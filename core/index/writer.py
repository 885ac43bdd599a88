"""Writing an index folder so that it appears all at once, or not at all.

Files go into a hidden staging folder beside the target (``.<index>.staging-<pid>``), each fsynced, ``manifest.json``
last; ``swap_in`` fsyncs its folders, renames the previous index aside and the staging folder into place, and deletes
the previous one. A crash or a full disk while writing leaves the previous index untouched; ``recover`` repairs a crash
between the two renames, and a failed second rename puts the previous index back at once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np

from core.dino.strategies import Strategy
from core.files import atomic_write_json, fsync_dir, json_bytes, sha256_file
from core.sketch import Int8Sketch, sketch_fits

from .layout import ARRAYS, ATTENTION, FORMAT, FORMAT_VERSION, MANIFEST, SKETCH_DIR, VARIANTS_DIR


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
        self.staging = staging_dir(out)

    def __enter__(self) -> IndexWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)  # not committed: leave no trace, keep the previous index

    @contextlib.contextmanager
    def _file(self, rel: str) -> Iterator[BinaryIO]:
        """A new file of the staging folder, fsynced once written (``swap_in`` persists the folders' entries)."""
        path = self.staging / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())

    def write_array(self, rel: str, array: np.ndarray) -> dict:
        """Save an array; returns its manifest entry (shape, dtype, sha256)."""
        with self._file(rel) as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
        return {"shape": list(array.shape), "dtype": array.dtype.name, "sha256": sha256_file(self.staging / rel)}

    def write_json(self, rel: str, obj: object) -> str:
        """Save a JSON document; returns its sha256."""
        with self._file(rel) as f:
            f.write(json_bytes(obj))
        return sha256_file(self.staging / rel)

    def commit(self, manifest: dict) -> None:
        atomic_write_json(self.staging / MANIFEST, manifest, indent=1)
        swap_in(self.staging, self.out)


def staging_dir(out: Path) -> Path:
    """The hidden folder beside ``out`` where a new index is assembled (``recover`` knows its name)."""
    return out.parent / f".{out.name}.staging-{os.getpid()}"


def swap_in(staging: Path, out: Path) -> None:
    """Make the complete folder ``staging`` the index ``out``: fsync its folders, rename the previous one aside,
    rename staging into place (putting the previous one back if that fails), delete the previous one."""
    for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
        fsync_dir(folder)
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    had_old = out.exists()
    if had_old:
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if had_old:
            os.rename(old, out)
        raise
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _write_tables(writer: IndexWriter, rel: str, embeddings: np.ndarray, neighbours: np.ndarray, scores) -> dict:
    """The three arrays of a strategy or a variant, under ``rel``: their manifest entries by file name."""
    arrays = (embeddings, neighbours.astype(np.int32), scores.astype(np.float32))
    return {f: writer.write_array(f"{rel}/{f}", a) for f, a in zip(ARRAYS, arrays, strict=True)}


def write_strategy(
    writer: IndexWriter,
    strategy: Strategy,
    embeddings: np.ndarray,
    neighbours: np.ndarray,
    scores: np.ndarray,
    checkpoint: dict,
    attention: np.ndarray | None = None,
    **extra: object,
) -> dict:
    """Write one strategy's three arrays, its sketch and its attention maps (as float16); returns its manifest
    entry (settings, checkpoint, files)."""
    name = strategy.name
    files = _write_tables(writer, name, embeddings, neighbours, scores)
    entry = strategy.to_manifest() | {"k": int(neighbours.shape[1]), "checkpoint": checkpoint, **extra, "files": files}
    if attention is not None:
        entry["attention"] = writer.write_array(f"{name}/{ATTENTION}", attention.astype(np.float16))
    if sketch_fits(embeddings.shape[1]):
        arrays = Int8Sketch.of(embeddings).arrays()
        entry["sketch"] = {"files": {f: writer.write_array(f"{name}/{SKETCH_DIR}/{f}", a) for f, a in arrays.items()}}
    return entry


def write_variant(
    writer: IndexWriter, strategy: str, variant: str, embeddings: np.ndarray, neighbours: np.ndarray, scores: np.ndarray
) -> dict:
    """Write a mirror/flip variant's three arrays; returns its entry for the strategy's "variants"."""
    return {"files": _write_tables(writer, f"{strategy}/{VARIANTS_DIR}/{variant}", embeddings, neighbours, scores)}


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
