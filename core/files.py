"""Files: durable all-or-nothing writes (a file appears under its final name only when complete) and hashing."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def fsync_dir(path: Path) -> None:
    """Persist a folder's entries (renames into it) across a power cut; best effort where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile(): a full disk, without errno


def os_error_words(e: OSError) -> str:
    """An OSError for people: a full disk or quota is said in words, with the file it hit."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device{where}"
    if e.errno is None and _SHORT_WRITE.search(str(e)):
        return f"no space left on device (a write was cut short: {e})"
    return str(e)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """Write through the yielded file, a hidden sibling of ``path``, fsynced and renamed to ``path`` on success,
    else removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
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


def json_bytes(obj: object, indent: int | None = None) -> bytes:
    """A JSON document as the project writes it: UTF-8, non-ASCII kept, a final newline."""
    return (json.dumps(obj, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def atomic_write_json(path: Path, obj: object, *, indent: int | None = None) -> None:
    atomic_write_bytes(path, json_bytes(obj, indent))


class Journal:
    """A run's finished steps, one fsynced JSON line each after a header naming the run; a torn last line is
    dropped, and the journal of another run (other source or options) is started anew."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        lines = []
        with contextlib.suppress(FileNotFoundError, ValueError):  # stops at a torn line
            for line in path.read_bytes().split(b"\n"):
                lines.append(json.loads(line))
        self.records = lines[1:] if lines[:1] == [{"run": header}] else []
        atomic_write_bytes(path, b"".join(map(json_bytes, [{"run": header}, *self.records])))
        self._file = open(path, "ab")  # noqa: SIM115 - appended to until close()

    def add(self, record: dict[str, Any]) -> None:
        self._file.write(json_bytes(record))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self, *, remove: bool = False) -> None:
        self._file.close()
        if remove:
            self.path.unlink(missing_ok=True)
            fsync_dir(self.path.parent)


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.savez(f, **arrays)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held across processes (flock on ``path``, created if needed; freed if the holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_sha_cache: dict[tuple[str, int, int], str] = {}
_HASH_CHUNK = 8 << 20  # hashing threads beside a busy main thread wait for the GIL once per chunk, not per 64 KB


def sha256_started(paths: list[Path], workers: int = 8) -> dict[Path, Future[str]]:
    """sha256 of many files, hashed in threads from now on (hashing releases the GIL): a future per path."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="sha256")
    futures = {path: pool.submit(sha256_file, path) for path in paths}
    pool.shutdown(wait=False)  # its threads end with the last file
    return futures


def sha256_files(paths: list[Path], workers: int = 8) -> list[str]:
    """sha256 of many files, in threads, in order."""
    futures = sha256_started(paths, workers)
    return [futures[path].result() for path in paths]


def sha256_file(path: Path, *, cache: bool = False) -> str:
    """The file's sha256, streamed; ``cache`` remembers it per (path, size, mtime) (checkpoints: hashed once)."""
    key = None
    if cache:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _sha_cache:
            return _sha_cache[key]
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(max(1, min(_HASH_CHUNK, os.fstat(f.fileno()).st_size)))  # a banner's: not 8 MB to zero
        view = memoryview(buf)
        while size := f.readinto(buf):
            h.update(view[:size])
    digest = h.hexdigest()
    if key is not None:
        _sha_cache[key] = digest
    return digest
