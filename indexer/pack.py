"""Packing an index folder, or some of its strategies, into one archive to ship to the web dynos.

The archive is a tar (gzipped for a ``.gz`` name) of ``apps.json``, the chosen strategies' files and a manifest
listing only those; ``<archive>.sha256`` (sha256sum's format) is what ``INDEX_SHA256`` must say. Entries are
sorted, with fixed times and owners, so the same index packs to the same bytes.
"""

from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from core.files import atomic_file, atomic_write_bytes, json_bytes, sha256_file
from core.index import APPS, ARRAYS, ATTENTION, MANIFEST, SKETCH_DIR, VARIANTS_DIR, LoadedIndex, load_index


@dataclass(frozen=True)
class Packed:
    path: Path
    sha256: str
    size: int
    strategies: list[str]
    upload_cache: dict[str, str]  # per strategy: what its uploads keep in the page cache (its sketch, its weights)


def pack_index(index_dir: Path, out: Path, strategies: list[str] | None = None) -> Packed:
    """Verify the index (full), then write the archive of the chosen strategies (all by default) and its sha256.

    Raises ``core.index.IndexInvalid`` for an index that the service would refuse (nothing is written).
    """
    index = load_index(index_dir, verify="full", strategies=strategies)
    names = list(index.strategies)
    manifest = dict(index.manifest) | {"strategies": {n: index.manifest["strategies"][n] for n in names}}
    files = [(APPS, index_dir / APPS)] + [(rel, index_dir / rel) for n in names for rel in strategy_files(n, index)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as raw:
        stream = gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) if out.name.endswith(".gz") else raw
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for folder in sorted({str(parent) for rel, _ in files for parent in PurePosixPath(rel).parents} - {"."}):
                tar.addfile(_info(folder, kind=tarfile.DIRTYPE))
            for rel, path in sorted(files):
                with open(path, "rb") as f:
                    tar.addfile(_info(rel, path.stat().st_size), f)
            data = json_bytes(manifest, indent=1)
            tar.addfile(_info(MANIFEST, len(data)), io.BytesIO(data))  # last, as the writer does
        if stream is not raw:
            stream.close()
    sha = sha256_file(out)
    atomic_write_bytes(out.with_name(out.name + ".sha256"), f"{sha}  {out.name}\n".encode())
    return Packed(out, sha, out.stat().st_size, names, {n: upload_cache(index_dir, index, n) for n in names})


def upload_cache(index_dir: Path, index: LoadedIndex, name: str) -> str:
    """What uploads on a strategy keep in the page cache to be fast: its int8 sketch and its backbone's weights."""
    sketch = sum((index_dir / rel).stat().st_size for rel in strategy_files(name, index) if f"/{SKETCH_DIR}/" in rel)
    return f"{sketch / 2**20:,.0f} MiB of sketch and the {index.strategies[name].strategy.backbone.label} weights"


def _info(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    """An entry with fixed owner and time (TarInfo's defaults: root, 0o644, mtime 0)."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, size
    if kind == tarfile.DIRTYPE:
        info.mode = 0o755
    return info


def strategy_files(name: str, index: LoadedIndex) -> list[str]:
    """Every file of a strategy the manifest lists: its tables, attention maps, sketch and variants' tables."""
    entry = index.manifest["strategies"][name]
    rels = [f"{name}/{a}" for a in ARRAYS] + ([f"{name}/{ATTENTION}"] if "attention" in entry else [])
    rels += [f"{name}/{SKETCH_DIR}/{f}" for f in entry.get("sketch", {}).get("files", {})]
    for variant, v in entry.get("variants", {}).items():
        rels += [f"{name}/{VARIANTS_DIR}/{variant}/{a}" for a in v["files"]]
    return rels
