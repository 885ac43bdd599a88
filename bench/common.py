"""Helpers shared by the benchmarks: options, tables and JSON results; the workspace, the server and the
memory readings they share with the tests come from devtools/.

Every benchmark is a command (``python bench/<name>.py``) that prints a short table; with ``--json PATH``
it also writes its figures (name, value, unit, target, pass) for ``bench/run_all.py``. With
``--workdir DIR`` the random checkpoints and the synthetic index are kept in DIR and reused by the
next benchmark (``run_all`` builds them once); without it they go to a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from devtools.cgroup import memory_of  # noqa: F401 - the benchmarks' helpers, from one place
from devtools.server import connection_owner, connections_per_worker, pin_many, running_server  # noqa: F401
from devtools.workspace import Workspace, load_apps, make_banner, write_banners  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent


DINO_CODES = ("S16", "S8", "B16", "B8")
QUICK_APPS = 2000  # games in the index with --quick (every benchmark the same, so that they share it)


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


def _read(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def machine_line() -> str:
    """Cores and load, to read the figures against; warns when the CPU is shared (torch-free: imports
    nothing heavy, so that the benchmarks of the service never import torch themselves)."""
    from core.cpu import cpu_cores

    cores = cpu_cores()
    load = os.getloadavg()[0]
    model = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo") if ln.startswith("model name")), "")
    mem = next((int(ln.split()[1]) // 2**20 for ln in _read("/proc/meminfo") if ln.startswith("MemTotal")), 0)
    line = f"machine: {cores} cores{f' ({model})' if model else ''}, {mem} GiB, Python {platform.python_version()}"
    line += f", load average {load:.1f}"
    if load > cores:
        line += " (other processes are using the CPU: figures are pessimistic)"
    return line


@contextlib.contextmanager
def service_workspace(args: argparse.Namespace, codes: Sequence[str]) -> Iterator[tuple[Workspace, dict, Path]]:
    """What the benchmarks of the running service start from: the workspace (``--workdir``) with the
    random checkpoints of ``codes`` and the synthetic index of ``--apps`` games (``ensure_index``'s
    record of it), and a temporary folder for the server's log."""
    with Workspace(args.workdir) as ws, tempfile.TemporaryDirectory() as logs:
        ws.ensure_checkpoints(codes)
        params = ws.ensure_index(args.apps)
        yield ws, params, Path(logs)


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


# -- HTTP helpers -------------------------------------------------------------------------------------
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
