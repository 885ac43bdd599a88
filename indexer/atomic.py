"""Durable, all-or-nothing file writes: a file appears under its final name only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (renames into it) across a power cut; best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: Path) -> Path:
    """A hidden sibling that no reader of the folder mistakes for the real file."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write through the yielded file; on success it is fsynced and renamed to ``path``, else removed."""
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: Path, obj: object, *, indent: int | None = None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=indent) + "\n").encode("utf-8"))


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.savez(f, **arrays)
