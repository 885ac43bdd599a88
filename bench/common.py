"""Helpers shared by the benchmarks: a workspace of random checkpoints and a synthetic index, the real
service under gunicorn, memory readings from /proc, load-generator plumbing, tables and JSON results.

Every benchmark is a command (``python bench/<name>.py``) that prints a short table; with ``--json PATH``
it also writes its figures (name, value, unit, target, pass) for ``bench/run_all.py``. With
``--workdir DIR`` the random checkpoints and the synthetic index are kept in DIR and reused by the
next benchmark (``run_all`` builds them once); without it they go to a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from devtools.server import GunicornServer as Server
from devtools.server import connection_owner, connections_per_worker, free_port, running_server  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


DINO_CODES = ("S16", "S8", "B16", "B8")
QUICK_APPS = 2000  # games in the index with --quick (every benchmark the same, so that they share it)
UPLOAD_SEEDS = 24  # the banners that serve, upload and memory post are seeds below this (Workspace.ensure_uploads)
MB = 2**20


# -- results and tables -----------------------------------------------------------------------------
@dataclass
class Figure:
    """One measured figure, with its target when there is one (``passed`` None: no target)."""

    bench: str
    name: str
    value: float | str
    unit: str = ""
    target: str = ""
    passed: bool | None = None
    note: str = ""

    def shown(self) -> str:
        if isinstance(self.value, float):
            v = self.value
            text = f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        else:
            text = str(self.value)
        return f"{text} {self.unit}".strip()


@dataclass
class Results:
    bench: str
    figures: list[Figure] = field(default_factory=list)

    def add(self, name: str, value, unit: str = "", target: str = "", passed: bool | None = None, note: str = ""):
        fig = Figure(self.bench, name, value, unit, target, passed, note)
        self.figures.append(fig)
        return fig

    def write(self, path: str | os.PathLike | None) -> None:
        if path:
            Path(path).write_text(json.dumps([asdict(f) for f in self.figures], indent=1))


def read_results(path: str | os.PathLike) -> list[Figure]:
    return [Figure(**d) for d in json.loads(Path(path).read_text())]


def verdict(passed: bool | None) -> str:
    return "" if passed is None else ("PASS" if passed else "MISS")


def print_table(headers: Sequence[str], rows: Sequence[Sequence], title: str | None = None) -> str:
    """A plain text table (numbers right-aligned); printed and returned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(_is_num(row[i]) or row[i] is None for row in rows) for i in range(len(headers))]

    def line(values):
        pairs = enumerate(zip(values, widths, strict=True))
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in pairs)

    out = []
    if title:
        out.append(title)
    out.append(line(headers).rstrip())
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r).rstrip() for r in cells)
    text = "\n".join(out)
    print(text, flush=True)
    return text


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 0.01 or v == 0:
            return f"{v:.2f}"
        return f"{v:.1e}"
    return str(v)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the benchmark runs (smoke test)")
    p.add_argument("--workdir", type=Path, default=None, help="keep checkpoints and index here, reuse them")
    p.add_argument("--json", type=Path, default=None, help="also write the figures as JSON here")
    return p


def add_index_options(p: argparse.ArgumentParser, *, backbones: bool) -> None:
    """The options of benchmarks over the synthetic catalog index: its size and, if asked, the backbones."""
    if backbones:
        p.add_argument("--backbones", default=",".join(DINO_CODES))
    p.add_argument("--apps", type=int, default=None, help="games in the index (default: the whole catalog)")


def chosen_backbones(args: argparse.Namespace) -> list[str]:
    """The --backbones list; with --quick and no explicit --backbones, ViT-S/16 alone."""
    if args.quick and "--backbones" not in sys.argv:
        return ["S16"]
    return [c.strip() for c in args.backbones.split(",") if c.strip()]


def skip_exit_collection() -> None:
    """Last thing a benchmark that used torch does: Python's garbage collection at exit, over all of
    torch's objects, takes seconds, and the process is ending anyway (``gc.freeze`` leaves them out)."""
    import gc

    gc.freeze()


def machine_line() -> str:
    """Cores and load, to read the figures against; warns when the CPU is shared (torch-free: imports
    nothing heavy, so that the benchmarks of the service never import torch themselves)."""
    from core.cpu import cpu_cores

    cores = cpu_cores()
    load = os.getloadavg()[0]
    line = f"machine: {cores} cores, load average {load:.1f}"
    if load > cores:
        line += " (other processes are using the CPU: figures are pessimistic)"
    return line


# -- the workspace: random checkpoints and a synthetic index ----------------------------------------
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
        self.index = self.root / "index"
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
        from core.files import sha256_file

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
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
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
        changed. Returns {"apps": count, "source", "strategies": names, "k", "shas"}."""
        shas = self.existing_shas()
        wanted = {"n_apps": n_apps, "spec": strategies, "k": k, "shas": shas}
        stamp = self.root / "index.params.json"
        if (self.index / "manifest.json").is_file() and stamp.is_file():
            recorded = json.loads(stamp.read_text())
            if recorded.get("wanted") == wanted:
                return recorded["info"]
        from core.dino.strategies import parse_strategies
        from indexer.synthetic import load_catalog, write_synthetic_index

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


@contextlib.contextmanager
def service_workspace(args: argparse.Namespace, codes: Sequence[str]) -> Iterator[tuple[Workspace, dict, Path]]:
    """What the benchmarks of the running service start from: the workspace (``--workdir``) with the
    random checkpoints of ``codes`` and the synthetic index of ``--apps`` games (``ensure_index``'s
    record of it), and a temporary folder for the server's log."""
    with Workspace(args.workdir) as ws, tempfile.TemporaryDirectory() as logs:
        ws.ensure_checkpoints(codes)
        params = ws.ensure_index(args.apps)
        yield ws, params, Path(logs)


def load_apps(index: Path) -> list[dict]:
    return json.loads((index / "apps.json").read_text(encoding="utf-8"))


# -- banners ----------------------------------------------------------------------------------------
def make_banner(seed: int, size: tuple[int, int] = (300, 450)):
    """A synthetic 300x450 banner, deterministic per seed (the tests' stand-in for real art)."""
    from indexer.synthetic import synthetic_banner

    return synthetic_banner(seed, size)


def banner_jpeg(seed: int, cache: Path | None = None) -> bytes:
    """Banner ``seed`` as JPEG bytes; with ``cache``, read from ``<cache>/<seed>.jpg`` when written before.
    Making one imports indexer.synthetic, and torch with it (seconds): the benchmarks of the service,
    which have no other use for torch, read the ones ``run_all`` wrote into the workspace."""
    import io

    path = cache / f"{seed}.jpg" if cache is not None else None
    if path is not None and path.is_file():
        return path.read_bytes()
    buf = io.BytesIO()
    make_banner(seed).save(buf, format="JPEG", quality=90)
    if path is not None:
        from core.files import atomic_write_bytes

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


# -- the service under gunicorn ---------------------------------------------------------------------
def gunicorn_settings(env: dict[str, str] | None = None) -> dict:
    """The project's gunicorn.conf.py evaluated as gunicorn would (workers, threads...), for titles."""
    saved = dict(os.environ)
    try:
        os.environ.update(env or {})
        scope: dict = {}
        exec(compile((ROOT / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"), scope)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {k: v for k, v in scope.items() if isinstance(v, int | str | bool) and not k.startswith("__")}


def pin_many(
    srv: Server, pids: Sequence[int], per_worker: int, tries: int = 200
) -> dict[int, list[http.client.HTTPConnection]]:
    """``per_worker`` keep-alive connections held by each worker (fewer if ``tries`` connections did not do)."""
    pinned: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in pids}
    spare = []
    for _ in range(tries):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
        conn.request("GET", "/health")
        conn.getresponse().read()
        owner = connection_owner(srv.port, conn.sock.getsockname()[1], pids)
        if owner is not None and len(pinned[owner]) < per_worker:
            pinned[owner].append(conn)
        else:
            spare.append(conn)
        if all(len(c) == per_worker for c in pinned.values()):
            break
        time.sleep(0.01)
    for c in spare:
        c.close()
    return {pid: conns for pid, conns in pinned.items() if conns}


# -- memory ------------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes (Rss, Pss, Pss_Anon, Pss_File, Private_*, Shared_*...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def memory_of(pid: int, under: Path | None = None) -> dict[str, float]:
    """RSS, PSS and USS (private) of a process in MiB, plus the same for its mappings of files under
    ``under`` (the index tables), from /proc/<pid>/smaps_rollup and /proc/<pid>/smaps."""
    r = smaps_rollup(pid)
    out = {
        "rss": r.get("Rss", 0) / MB,
        "pss": r.get("Pss", 0) / MB,
        "uss": (r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / MB,
        "anon": r.get("Anonymous", 0) / MB,
    }
    if under is not None:
        prefix = str(Path(under).resolve())
        totals = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
        inside = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            first = line.split(None, 1)[0]
            if not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                inside = len(parts) == 6 and parts[5].startswith(prefix)
            elif inside and first[:-1] in totals:
                totals[first[:-1]] += int(line.split()[1]) * 1024
        out["tables_rss"] = totals["Rss"] / MB
        out["tables_pss"] = totals["Pss"] / MB
        out["tables_uss"] = (totals["Private_Clean"] + totals["Private_Dirty"]) / MB
    return out


# -- HTTP helpers -------------------------------------------------------------------------------------
def parse_server_timing(header: str | None) -> dict[str, float]:
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def verify_matches(base_url: str, index: Path, appids: Sequence[int], strategies: Sequence[str], k: int = 10) -> int:
    """GET /match for each (appid, strategy) and compare with the index's tables; returns the number checked.
    Raises AssertionError on the first answer that differs."""
    import requests

    apps = load_apps(index)
    row_of = {a["appid"]: i for i, a in enumerate(apps)}
    tables = {
        s: (np.load(index / s / "neighbours.npy", mmap_mode="r"), np.load(index / s / "scores.npy", mmap_mode="r"))
        for s in strategies
    }
    checked = 0
    with requests.Session() as http:
        for appid in appids:
            for s in strategies:
                r = http.get(f"{base_url}/match/{appid}", params={"strategy": s, "k": k}, timeout=30)
                assert r.status_code == 200, f"/match/{appid}?strategy={s}: {r.status_code} {r.text[:200]}"
                body = r.json()
                nbr, sco = tables[s]
                row = row_of[appid]
                want = [apps[i]["appid"] for i in nbr[row, :k]]
                got = [m["appid"] for m in body["matches"]]
                assert got == want, f"/match/{appid}?strategy={s}: appids {got[:3]}... != table {want[:3]}..."
                diff = np.abs(np.array([m["score"] for m in body["matches"]]) - sco[row, :k]).max()
                assert diff <= 1e-6, f"/match/{appid}?strategy={s}: scores differ from the table by {diff}"
                checked += 1
    return checked
