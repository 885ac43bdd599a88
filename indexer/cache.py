"""The build's embedding cache (``.<index>.work/`` beside the index, locked by one build): resumable, incremental.

Every finished batch is written at once, atomically, as a chunk (each banner's sha256, its float32 features per
strategy key, the banners that could not be decoded and why): a killed run loses at most the batch in flight.
A successful build merges the chunks into one store file per key, which later builds reuse. A key hashes what
determines the features: the strategy's settings, the checkpoint's sha256, the precision.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.files import atomic_save_npz, atomic_write_json

FAILED = "failed.json"


def strategy_key(strategy_entry: dict, checkpoint_sha256: str, precision: str) -> str:
    # bf16/fp16: the weights are cast to that type, which the key says, so that other numerics' features never match
    numerics = {} if precision == "fp32" else {"numerics": "weights cast"}
    blob = json.dumps(
        {"strategy": strategy_entry, "checkpoint": checkpoint_sha256, "precision": precision} | numerics,
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def variant_key(key: str, variant: str) -> str:
    """The cache key of a strategy's embeddings of a mirror/flip variant."""
    return hashlib.sha256(f"{key}|{variant}".encode()).hexdigest()[:20]


class BuildLocked(RuntimeError):
    pass


_HELD: set[str] = set()  # cache folders locked by this process


class EmbeddingCache:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.chunks = folder / "chunks"
        self.store = folder / "store"
        self.vectors: dict[str, dict[str, np.ndarray]] = {}
        self.failed: dict[str, str] = {}
        self._lock_fd: int | None = None
        self._lock_key = ""

    def __enter__(self) -> EmbeddingCache:
        """Take the build lock: a POSIX record lock, the process's own, freed when it exits (an ``flock`` is the
        open file's, kept by forked decoding workers that outlive a killed build). Record locks do not exclude
        within one process, hence ``_HELD``."""
        self.chunks.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(exist_ok=True)
        key = str(self.folder.resolve())
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            if key in _HELD:
                raise BlockingIOError
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EAGAIN or EACCES: another process holds it
            os.close(fd)
            raise BuildLocked(f"another build is using {self.folder}; wait for it to finish") from None
        _HELD.add(key)
        self._lock_fd, self._lock_key = fd, key
        try:
            self._load()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the record lock
            _HELD.discard(self._lock_key)
            self._lock_fd = None

    def _load(self) -> None:
        for path in sorted(self.store.glob("*.npz")):
            self._load_npz(path)
        failed = self.store / FAILED
        if failed.is_file():
            try:
                self.failed.update(json.loads(failed.read_text()))
            except (OSError, ValueError, TypeError) as e:  # retried on this run instead: nothing is lost
                print(f"warning: ignoring unreadable cache file {failed}: {e}", file=sys.stderr)
        for path in sorted(self.chunks.glob("*.npz")):
            self._load_npz(path)
        for tmp in [*self.chunks.glob(".*"), *self.store.glob(".*")]:
            tmp.unlink(missing_ok=True)  # temporaries of a killed run

    def _load_npz(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as z:
                shas = [str(s) for s in z["sha256"]]
                for name in (n for n in z.files if n.startswith("f_")):
                    self.vectors.setdefault(name[2:], {}).update(zip(shas, z[name], strict=True))
                if "failed_sha256" in z.files:
                    self.failed.update(zip(map(str, z["failed_sha256"]), map(str, z["failed_reason"]), strict=True))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # only outside damage gets here
            print(f"warning: ignoring unreadable cache file {path}: {e or type(e).__name__}", file=sys.stderr)

    def get(self, key: str, sha: str) -> np.ndarray | None:
        return self.vectors.get(key, {}).get(sha)

    def add_batch(self, shas: list[str], features: dict[str, np.ndarray], failed: dict[str, str]) -> None:
        """Persist one batch (atomically, durably), then make it visible to ``get``."""
        arrays = {"sha256": np.array(shas, dtype="U64")}
        arrays |= {f"f_{key}": np.ascontiguousarray(v, dtype=np.float32) for key, v in features.items()}
        if failed:
            arrays["failed_sha256"] = np.array(list(failed), dtype="U64")
            arrays["failed_reason"] = np.array(list(failed.values()))
        atomic_save_npz(self.chunks / f"{uuid.uuid4().hex}.npz", **arrays)
        for key, feats in features.items():
            self.vectors.setdefault(key, {}).update(zip(shas, np.asarray(feats, dtype=np.float32), strict=True))
        self.failed.update(failed)

    def consolidate(self) -> None:
        """Merge everything into one store file per strategy key (in threads) and drop the chunks."""

        def save(key: str, table: dict[str, np.ndarray]) -> None:
            shas = sorted(table)
            atomic_save_npz(
                self.store / f"{key}.npz",
                sha256=np.array(shas, dtype="U64"),
                **{f"f_{key}": np.stack([table[s] for s in shas]) if shas else np.zeros((0, 0), np.float32)},
            )

        with ThreadPoolExecutor(max(1, min(8, len(self.vectors)))) as pool:
            list(pool.map(save, self.vectors, self.vectors.values()))
        atomic_write_json(self.store / FAILED, self.failed)
        for chunk in self.chunks.glob("*.npz"):
            chunk.unlink()
