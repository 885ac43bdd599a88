"""Loading an index folder (``layout.py``) with every check the service relies on: anything missing, partial, of
another format version or inconsistent is an ``IndexInvalid`` naming the file, so the service never serves wrong data.

Arrays are memory-mapped read-only, shared by the gunicorn workers through the page cache. Verification (sha256
with ``verify="full"``; the tables' ranges always) reads through short-lived mappings, a chunk of rows at a time, so
nothing stays resident in the process that verified them (the gunicorn master).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.apps import AppColumns, AppsInvalid, validate_apps
from core.cpu import cpu_cores
from core.dino.strategies import Strategy
from core.files import sha256_file, sha256_started
from core.sketch import Int8Sketch
from core.variants import UnknownVariant, variant_name

from .layout import (
    APPS,
    ARRAYS,
    ATTENTION,
    EMBEDDING_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SKETCH_DIR,
    VARIANTS_DIR,
)


class IndexInvalid(RuntimeError):
    """The index folder cannot be served; the message names the file and the problem."""


@dataclass
class VariantTables:
    """A mirror/flip variant's query embeddings and their tables against the plain embeddings."""

    embeddings: np.ndarray
    neighbours: np.ndarray
    scores: np.ndarray


@dataclass
class StrategyIndex:
    """One strategy's tables, memory-mapped, plus what is needed to embed queries like the index."""

    strategy: Strategy
    embeddings: np.ndarray
    neighbours: np.ndarray
    scores: np.ndarray
    checkpoint: dict
    entry: dict
    variants: dict[str, VariantTables] = field(default_factory=dict)
    sketch: Int8Sketch | None = None  # the upload search's prefilter, when the index has it
    attention: np.ndarray | None = None  # (N, h, w) attention maps, when the index has them

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[1])


@dataclass
class LoadedIndex:
    path: Path
    manifest: dict
    apps: AppColumns
    strategies: dict[str, StrategyIndex] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.apps)

    @property
    def appids(self) -> np.ndarray:
        return self.apps.appids


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IndexInvalid(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexInvalid(f"{path}: unreadable {what}: {e}") from None


class _Digests:
    """The index files' sha256, hashed in threads while loading goes on, each checked when its file is opened."""

    def __init__(self, root: Path, strategies: list[str]) -> None:
        folders = [root / name for name in strategies if name not in ("", ".", "..")]  # no folder above
        tables = sorted(p for f in folders if f.parent == root for p in f.rglob("*.npy") if p.is_file())
        self._futures = sha256_started([root / APPS, *tables], workers=cpu_cores())

    def check(self, path: Path, sha256: object) -> None:
        future = self._futures.get(path)
        if (future.result() if future is not None else sha256_file(path)) != sha256:
            raise IndexInvalid(f"{path}: sha256 does not match the manifest (a partial copy or a changed file)")


def _open_array(
    path: Path, spec: dict, shape: tuple[int, ...], dtypes: tuple[str, ...], digests: _Digests | None
) -> np.ndarray:
    if not path.is_file():
        raise IndexInvalid(f"{path}: missing")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # EOFError: an empty or cut-short file
        raise IndexInvalid(f"{path}: not a readable .npy file ({e or type(e).__name__})") from None
    if arr.shape != shape:
        raise IndexInvalid(f"{path}: shape {arr.shape}, expected {shape}")
    if arr.dtype.name not in dtypes or arr.dtype.name != spec.get("dtype"):
        raise IndexInvalid(f"{path}: dtype {arr.dtype.name}, manifest says {spec.get('dtype')} (allowed: {dtypes})")
    if digests is not None:
        digests.check(path, spec.get("sha256"))
    return arr


def load_index(path: str | Path, *, verify: str = "full", strategies: list[str] | None = None) -> LoadedIndex:
    """Open and check an index folder; ``verify`` is "full" (sha256 of every file) or "quick" (no sha256)."""
    if verify not in ("full", "quick"):
        raise ValueError("verify must be 'full' or 'quick'")
    root = Path(path)
    if not root.is_dir():
        raise IndexInvalid(f"{root}: no index folder here (build one with scripts/build_index.py)")
    manifest = _read_json(root / MANIFEST, "manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IndexInvalid(f"{root / MANIFEST}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexInvalid(
            f"{root / MANIFEST}: format version {manifest.get('format_version')!r}; this service reads version "
            f"{FORMAT_VERSION}. Rebuild the index with this version's scripts/build_index.py."
        )
    apps_path = root / APPS
    try:
        apps = validate_apps(_read_json(apps_path, "app list"), str(apps_path), duplicates="error")
    except AppsInvalid as e:
        raise IndexInvalid(str(e)) from None
    n = len(apps)
    if manifest.get("num_apps") != n:
        raise IndexInvalid(f"{apps_path}: {n} apps, manifest says {manifest.get('num_apps')}")
    entries = manifest.get("strategies")
    if not isinstance(entries, dict) or not entries:
        raise IndexInvalid(f"{root / MANIFEST}: no strategies")
    wanted = list(entries) if strategies is None else strategies
    missing = [s for s in wanted if s not in entries]
    if missing:
        raise IndexInvalid(f"{root}: strategies {missing} are not in this index (it has {sorted(entries)})")
    digests = _Digests(root, wanted) if verify == "full" else None
    if digests is not None:
        digests.check(apps_path, manifest.get("apps_sha256"))
    columns = AppColumns(apps)
    index = LoadedIndex(root, manifest, columns)
    for name in wanted:
        index.strategies[name] = _load_strategy(root, name, entries[name], n, digests)
    return index


def _load_strategy(root: Path, name: str, entry: dict, n: int, digests: _Digests | None) -> StrategyIndex:
    where = f"{root / MANIFEST} [{name}]"
    if not isinstance(entry, dict):
        raise IndexInvalid(f"{where}: not an object")
    try:
        strategy = Strategy.from_manifest(name, entry)
    except ValueError as e:
        raise IndexInvalid(f"{where}: {e}") from None
    files, k, checkpoint = _files(entry, ARRAYS, where), entry.get("k"), entry.get("checkpoint")
    if not isinstance(k, int) or not 0 <= k < max(n, 1):
        raise IndexInvalid(f"{where}: k={k!r} is not in 0..{n - 1}")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("sha256"), str):
        raise IndexInvalid(f"{where}: no checkpoint sha256 recorded")
    folder = root / name
    emb, nbr, sco = _load_tables(folder, files, (n, strategy.dim, k), digests)
    variants = _load_variants(folder, where, entry.get("variants", {}), (n, strategy.dim, k), digests)
    sketch = _load_sketch(folder / SKETCH_DIR, where, entry.get("sketch"), (n, strategy.dim), digests)
    spec, attention = entry.get("attention"), None
    if spec is not None:  # optional: an index without attention maps serves without them
        if not isinstance(spec, dict):
            raise IndexInvalid(f"{where}: 'attention' must describe {ATTENTION}")
        attention = _open_array(folder / ATTENTION, spec, (n, *strategy.grid), ("float16",), digests)
    return StrategyIndex(strategy, emb, nbr, sco, checkpoint, entry, variants, sketch, attention)


def _files(entry: object, names: tuple[str, ...], where: str) -> dict:
    """The manifest's description of a table's files, which must name exactly ``names``."""
    files = entry.get("files") if isinstance(entry, dict) else None
    if not isinstance(files, dict) or set(files) != set(names):
        raise IndexInvalid(f"{where}: 'files' must describe {', '.join(names)}")
    return files


def _load_tables(
    folder: Path, files: dict, shape: tuple[int, int, int], digests: _Digests | None
) -> tuple[np.ndarray, ...]:
    n, dim, k = shape
    emb = _open_array(folder / ARRAYS[0], files[ARRAYS[0]], (n, dim), EMBEDDING_DTYPES, digests)
    nbr = _open_array(folder / ARRAYS[1], files[ARRAYS[1]], (n, k), ("int32",), digests)
    sco = _open_array(folder / ARRAYS[2], files[ARRAYS[2]], (n, k), ("float32",), digests)
    if n and k:  # both modes: the tables are small (N x K) and a bad row index would be served or crash
        _check_tables(folder / ARRAYS[1], folder / ARRAYS[2], n)
    return emb, nbr, sco


CHECK_ROWS = 4096  # rows per verification step: bounded temporaries, whatever the index size


def _check_tables(nbr_path: Path, sco_path: Path, n: int) -> None:
    """Neighbour indices in range and never the row itself; scores finite and sorted best first (through
    mappings of its own, dropped on return, so the serving mappings stay untouched)."""
    nbr = np.load(nbr_path, mmap_mode="r")
    sco = np.load(sco_path, mmap_mode="r")
    for start in range(0, n, CHECK_ROWS):
        nb = np.asarray(nbr[start : start + CHECK_ROWS])
        rows = np.arange(start, start + len(nb), dtype=np.int64)[:, None]
        if nb.min() < 0 or nb.max() >= n or bool((nb == rows).any()):
            raise IndexInvalid(f"{nbr_path}: indices out of range or a row listed as its own neighbour")
        sc = np.asarray(sco[start : start + CHECK_ROWS])
        if not np.isfinite(sc).all() or bool((np.diff(sc, axis=1) > 1e-6).any()):
            raise IndexInvalid(f"{sco_path}: scores not finite or not sorted best first")


def _load_variants(
    folder: Path, where: str, entries: object, shape: tuple[int, int, int], digests: _Digests | None
) -> dict:
    """The optional mirror/flip tables."""
    if not isinstance(entries, dict):
        raise IndexInvalid(f"{where}: 'variants' must be an object")
    out = {}
    for name, entry in entries.items():
        try:
            canonical = variant_name(name.split("+")) if isinstance(name, str) and name else None
        except UnknownVariant:
            canonical = None
        if canonical != name:
            raise IndexInvalid(f"{where}: unknown variant {name!r} (known: mirror, flip, mirror+flip)")
        files = _files(entry, ARRAYS, f"{where} variant {name}")
        out[name] = VariantTables(*_load_tables(folder / VARIANTS_DIR / name, files, shape, digests))
    return out


def _load_sketch(
    folder: Path, where: str, entry: object, shape: tuple[int, int], digests: _Digests | None
) -> Int8Sketch | None:
    """The optional int8 sketch of the embeddings; its scales and norms must be finite and non-negative, since
    every search's bounds are made of them."""
    if entry is None:
        return None
    files, (n, dim) = _files(entry, Int8Sketch.FILES, f"{where} sketch"), shape
    specs = (((n, dim), ("int8",)), ((dim,), ("float64",)), ((3, n), ("float64",)))  # in the order of FILES
    codes, columns, rows = [
        _open_array(folder / f, files[f], *spec, digests) for f, spec in zip(Int8Sketch.FILES, specs, strict=True)
    ]
    if not (np.isfinite(columns).all() and (columns > 0).all() and np.isfinite(rows).all() and (rows >= 0).all()):
        raise IndexInvalid(f"{folder}: sketch scales or norms not finite and positive")
    return Int8Sketch(codes, columns, rows)
