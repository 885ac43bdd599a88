"""The benchmarks' and tests' workspace: random full-size checkpoints, a synthetic catalog index, banners.

Development only, like ``devtools/server.py``. ``Workspace(root)`` keeps what it makes in ``root`` and
reuses it while still valid (``bench/run_all.py`` makes it once for every benchmark).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from core.files import atomic_file, atomic_write_bytes, sha256_file

UPLOAD_SEEDS = 24  # the banners that serve, upload and memory post are seeds below this (Workspace.ensure_uploads)


class Workspace:
    """Random full-size checkpoints in ``<root>/torch_home/hub/checkpoints`` and a synthetic index in
    ``<root>/index`` recording their sha256. Both are reused when present and still valid."""

    def __init__(self, root: Path | None) -> None:
        self._tmp = None
        if root is None:
            self._tmp = tempfile.mkdtemp(prefix="steam-dino-bench-")
            root = Path(self._tmp)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.torch_home = self.root / "torch_home"
        self.checkpoints = self.torch_home / "hub" / "checkpoints"
        self.index = self.root / "index"  # the whole catalog's; ensure_index points it at the index it made
        self.banners = self.root / "banners"  # empty: the service points banner URLs at the CDN
        self.banners.mkdir(exist_ok=True)
        self.uploads = self.root / "uploads"  # the JPEG banners the benchmarks post, by seed

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # The workspace's own records (checkpoints.json, index.params.json) let a benchmark reuse what is
    # there without importing torch or the app (seconds on a small machine).
    def _registry(self) -> dict:
        path = self.root / "checkpoints.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def checkpoint(self, code: str) -> tuple[Path, str]:
        """The random checkpoint of a backbone (written on first use, seeded) and its sha256."""
        entry = self._registry().get(code)
        if entry and Path(entry["path"]).is_file():
            return Path(entry["path"]), entry["sha256"]
        import torch

        from core.dino.backbones import BACKBONES
        from core.dino.vit import VisionTransformer

        backbone = BACKBONES[code]
        path = self.checkpoints / backbone.filename
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = VisionTransformer(backbone.config)
        with torch.no_grad():  # as the test suite's random checkpoints: varied biases and norms
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(torch.randn_like(p) * 0.1)
        with atomic_file(path) as f:
            torch.save(model.state_dict(), f)
        sha = sha256_file(path)
        registry = self._registry() | {code: {"path": str(path), "sha256": sha}}
        (self.root / "checkpoints.json").write_text(json.dumps(registry, indent=1))
        print(f"(random {backbone.label} checkpoint written in {time.perf_counter() - t0:.1f} s)", flush=True)
        return path, sha

    def ensure_checkpoints(self, codes: Sequence[str]) -> dict[str, str]:
        return {code: self.checkpoint(code)[1] for code in codes}

    def existing_shas(self) -> dict[str, str]:
        return {code: e["sha256"] for code, e in sorted(self._registry().items()) if Path(e["path"]).is_file()}

    def ensure_index(self, n_apps: int | None = None, strategies: str = "all", k: int = 100) -> dict:
        """The synthetic index (all eight strategies by default) over the catalog's first n_apps games
        (all 29,982 by default), recording the workspace's checkpoints; rebuilt only when one of these
        changed. One folder per size (``self.index`` is set to it), so that benchmarks of other sizes sharing
        the workspace neither rebuild nor replace it.
        Returns {"apps": count, "source", "strategies": names, "k", "shas"}."""
        shas = self.existing_shas()
        wanted = {"n_apps": n_apps, "spec": strategies, "k": k, "shas": shas}
        self.index = self.root / ("index" if n_apps is None else f"index-{n_apps}")
        stamp = self.root / f"{self.index.name}.params.json"
        if (self.index / "manifest.json").is_file() and stamp.is_file():
            recorded = json.loads(stamp.read_text())
            if recorded.get("wanted") == wanted:
                return recorded["info"]
        from core.dino.strategies import parse_strategies
        from devtools.synthetic import load_catalog, write_synthetic_index

        apps, source = load_catalog(n=n_apps)
        parsed = parse_strategies(strategies)
        t0 = time.perf_counter()
        write_synthetic_index(self.index, apps, parsed, k=k, checkpoint_sha256=shas)
        info = {"apps": len(apps), "source": source, "strategies": [s.name for s in parsed], "k": k, "shas": shas}
        stamp.write_text(json.dumps({"wanted": wanted, "info": info}))
        print(
            f"(synthetic index: {len(apps):,} apps from {source}, {len(parsed)} strategies, "
            f"k={k}, written in {time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        return info

    def upload_jpeg(self, seed: int) -> bytes:
        """Banner ``seed`` as the JPEG bytes the benchmarks post, written once into the workspace."""
        return banner_jpeg(seed, self.uploads)

    def ensure_uploads(self, n: int = UPLOAD_SEEDS) -> None:
        for seed in range(n):
            self.upload_jpeg(seed)

    def server_env(self, **extra: str) -> dict[str, str]:
        return {
            "INDEX_DIR": str(self.index),
            "BANNERS_DIR": str(self.banners),
            "TORCH_HOME": str(self.torch_home),
            "ALLOW_WEIGHTS_DOWNLOAD": "0",
            **extra,
        }


def load_apps(index: Path) -> list[dict]:
    return json.loads((index / "apps.json").read_text(encoding="utf-8"))


def make_banner(seed: int, size: tuple[int, int] = (300, 450)):
    """A synthetic 300x450 banner, deterministic per seed (the tests' stand-in for real art)."""
    from devtools.synthetic import synthetic_banner

    return synthetic_banner(seed, size)


def banner_jpeg(seed: int, cache: Path | None = None) -> bytes:
    """Banner ``seed`` as JPEG bytes; with ``cache``, read from ``<cache>/<seed>.jpg`` when written before.
    Making one imports devtools.synthetic, and torch with it (seconds): the benchmarks of the service,
    which have no other use for torch, read the ones ``run_all`` wrote into the workspace."""
    import io

    path = cache / f"{seed}.jpg" if cache is not None else None
    if path is not None and path.is_file():
        return path.read_bytes()
    buf = io.BytesIO()
    make_banner(seed).save(buf, format="JPEG", quality=90)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    return buf.getvalue()


def write_banners(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{10 * (i + 1)}.jpg"
        if not path.is_file():
            make_banner(i).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths
