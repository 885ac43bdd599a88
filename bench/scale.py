"""The store's size today: a synthetic catalog of 150,000 games, its index, its tables and its service on a 1 GiB dyno.

    python -m bench.scale [--apps 150000] [--baseline-apps 29982] [--serve ComplexB16] [--uploads 16] [--rounds 3]
                          [--lookups 600] [--limit-mib 1024] [--quick] [--workdir DIR] [--json PATH]

1. The index: the catalog of ``devtools.synthetic`` (the real 2021 one when ../shared has it, then synthetic games,
   each with a store banner path) with random embeddings of all eight strategies, written as the builder writes
   (random tables: the exact ones are timed in 2.): its size per strategy, and what an upload on each keeps in
   the page cache (its int8 sketch and its backbone's checkpoint).
2. The build's exact top-100 tables on the CPU for ComplexB16 (1536 dims): whole over the baseline catalog; over
   the full one, extrapolated from its first rows (every row costs one product against all rows).
3. The service (gunicorn, 2 workers, default settings but UPLOAD_QUEUE_TIMEOUT=300) over the strategies a 1 GB
   dyno is given (``--serve``, as ``steam-dino-pack-index --strategies`` packs them), in a ``--limit-mib`` memory
   cgroup and without a limit, each after the index and checkpoint are evicted from the page cache: launch to
   the first /health; rounds of concurrent uploads (half on each worker; the first round loads the models and is
   not timed); then lookups and name searches; the cgroup's peak and OOM kills. The ratios are the limited run's
   over the unlimited one's.
   The first /health over every strategy (the whole index verified) is measured too, without a limit.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import statistics
import time
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np

from bench.common import (
    QUICK_APPS,
    Results,
    Workspace,
    base_parser,
    load_apps,
    machine_line,
    percentile,
    pin_many,
    print_table,
    running_server,
    service_workspace,
)
from bench.memory import memory_limit, request, upload_round
from core.dino.strategies import parse_strategies
from devtools.cgroup import smaps_rollup
from devtools.synthetic import CATALOG_SIZE, STORE_SIZE

MIB = 2**20
TABLE_STRATEGY = "ComplexB16"
UPLOAD_ROW = "upload round trip, median (ms)"  # its ratio in the cgroup to no limit: the target (<= 1.5x)
NAME_QUERIES = ("portal", "dark souls", "star wars", "the", "a", "pokemon", "zombie survival", "sim", "620", "ōkami")


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--apps", type=int, default=STORE_SIZE, help="games in the catalog")
    p.add_argument("--baseline-apps", type=int, default=CATALOG_SIZE, help="games of the baseline table build")
    p.add_argument("--serve", default="ComplexB16", help="the strategies served (packed for the dyno)")
    p.add_argument("--uploads", type=int, default=16, help="concurrent uploads per round, half on each worker")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of uploads, after one that loads the models")
    p.add_argument("--lookups", type=int, default=600, help="GET /match lookups, and as many name searches")
    p.add_argument("--table-rows", type=int, default=2048, help="rows of the full table timed (then extrapolated)")
    p.add_argument("--limit-mib", type=int, default=1024, help="memory limit of the cgroup (0: none)")
    args = p.parse_args()
    if args.quick:
        args.apps, args.baseline_apps, args.uploads, args.rounds = QUICK_APPS, 500, 2, 1
        args.lookups, args.table_rows, args.serve = 50, 512, "ComplexS16"
    return args


def main() -> None:
    args = parse_args()
    res = Results("scale")
    print(machine_line(), flush=True)
    strategies = parse_strategies(args.serve)
    serve = [s.name for s in strategies]
    with service_workspace(args, sorted({s.backbone.code for s in strategies})) as (ws, info, tmp):
        sizes = index_sizes(ws.index, info["strategies"])
        tables = table_times(ws.index, args)
        served = subset_index(ws.index, tmp / "served", serve)
        whole = startup_only(ws, ws.index, tmp)
        runs = {0: serve_run(ws, served, serve, None, tmp, args)}
        cgroup = memory_limit(args.limit_mib)  # None: no limit asked, or none can be made here (said why)
        if cgroup is not None:
            try:
                runs[args.limit_mib] = serve_run(ws, served, serve, cgroup, tmp, args)
            finally:
                peak, oom = cgroup.peak() / MIB, cgroup.oom_kills()
                cgroup.remove()
            runs[args.limit_mib] |= {"peak": peak, "oom": oom}
    report(res, args, info, sizes, tables, whole, runs)
    res.write(args.json)


def index_sizes(index: Path, strategies: list[str]) -> list[list]:
    """Per strategy: MiB on disk, of which its int8 sketch, and its backbone's checkpoint (float32 weights)."""
    rows = []
    for name in strategies:
        files = [p for p in (index / name).rglob("*") if p.is_file()]
        sketch = sum(p.stat().st_size for p in files if "sketch" in p.parts)
        weights = checkpoint_mib(name)
        rows.append([name, sum(p.stat().st_size for p in files) / MIB, sketch / MIB, weights, sketch / MIB + weights])
    return rows


def checkpoint_mib(strategy: str) -> float:
    """The size of a strategy's official checkpoint: its backbone's parameters as float32 (no memory used)."""
    import torch

    from core.dino.vit import VisionTransformer

    with torch.device("meta"):
        model = VisionTransformer(parse_strategies(strategy)[0].backbone.config)
    return sum(p.numel() for p in model.parameters()) * 4 / MIB


def table_times(index: Path, args) -> dict[str, float]:
    """Seconds of ComplexB16's exact top-100 table: whole over the baseline's first rows, and over every row,
    extrapolated from its first ``--table-rows`` (at least two chunks): the set-up and the first chunk (norms,
    the float32 copy, cold caches) once, then the later chunks' pace for the rows left."""
    from core.knn import topk_table

    emb = np.load(index / TABLE_STRATEGY / "embeddings.npy")
    t0 = time.perf_counter()
    topk_table(emb[: args.baseline_apps], 100)
    baseline = time.perf_counter() - t0
    marks: list[tuple[int, float]] = []  # (rows done, seconds) after each chunk

    class Enough(Exception):
        pass

    def progress(rows: int) -> None:
        marks.append(((marks[-1][0] if marks else 0) + rows, time.perf_counter() - t0))
        if len(marks) > 1 and marks[-1][0] >= args.table_rows:
            raise Enough

    t0 = time.perf_counter()
    with contextlib.suppress(Enough):
        topk_table(emb, 100, progress=progress)
    (first_rows, first_s), (rows, seconds) = marks[0], marks[-1]
    if rows < len(emb):
        seconds = first_s + (seconds - first_s) * (len(emb) - first_rows) / (rows - first_rows)
    return {"baseline": baseline, "full": seconds, "rows": rows}


def subset_index(src: Path, dst: Path, names: list[str]) -> Path:
    """The index of only these strategies (hard links), as ``pack_index --strategies`` ships it."""
    import json

    dst.mkdir(parents=True)
    os.link(src / "apps.json", dst / "apps.json")
    for name in names:
        shutil.copytree(src / name, dst / name, copy_function=os.link)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["strategies"] = {n: manifest["strategies"][n] for n in names}
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def evict(*folders: Path) -> None:
    """Drop these files' pages from the page cache, so that a run reads (and its cgroup is charged for) them."""
    for path in (p for f in folders for p in f.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def startup_only(ws: Workspace, index: Path, logs: Path) -> float:
    """Launch to the first /health over the whole index (every file's sha256 checked), from a cold cache."""
    evict(index)
    with running_server(ws.server_env(INDEX_DIR=str(index)), logs, "whole") as srv:
        return srv.startup_s


def serve_run(ws: Workspace, index: Path, serve: list[str], cgroup, logs: Path, args) -> dict:
    """The figures of one run of the service over ``index`` (in ``cgroup`` when one is given)."""
    evict(index, ws.torch_home)
    env = ws.server_env(INDEX_DIR=str(index), UPLOAD_QUEUE_TIMEOUT="300")  # queued uploads wait: timed, not refused
    with running_server(env, logs, f"served-{bool(cgroup)}", cgroup=cgroup) as srv:
        out = {"startup": srv.startup_s}
        pids = srv.workers(expect=2)
        bodies = [ws.upload_jpeg(7 + i) for i in range(args.uploads)]
        rtts, searches = [], []
        for strategy in serve:
            for r in range(args.rounds + 1):
                timed = upload_round(srv, pids, strategy, bodies)
                if r:  # the first round loads the models
                    rtts += [rtt for *_, rtt in timed]
                    searches += [t["search"] for t, *_ in timed]
        out |= {"upload": statistics.median(rtts), "search": statistics.median(searches)}
        conn = pin_many(srv, pids[:1], 1)[pids[0]][0]
        rng = random.Random(0)
        appids = [a["appid"] for a in load_apps(index)]
        out["lookups"] = timed_gets(conn, [f"/match/{rng.choice(appids)}?k=10" for _ in range(args.lookups)])
        names = [f"/apps?q={quote_plus(q)}&limit={rng.randint(5, 20)}" for q in NAME_QUERIES * 4]
        out["names"] = timed_gets(conn, [names[i % len(names)] for i in range(args.lookups)])
        rollups = [smaps_rollup(pid) for pid in [srv.pid, *pids]]
        out["pss"] = sum(r["Pss"] for r in rollups) / MIB
        out["anon"] = sum(r["Pss_Anon"] for r in rollups) / MIB
    return out


def timed_gets(conn, paths: list[str]) -> tuple[float, float]:
    """p50 and p99 in ms of these GETs, one after the other on a keep-alive connection."""
    times = []
    for path in paths:
        t0 = time.perf_counter()
        request(conn, "GET", path)
        times.append((time.perf_counter() - t0) * 1e3)
    return percentile(times, 50), percentile(times, 99)


def report(res: Results, args, info: dict, sizes: list, tables: dict, whole: float, runs: dict) -> None:
    n, base = info["apps"], args.baseline_apps
    print()
    print_table(
        ["strategy", "index MiB", "sketch MiB", "checkpoint MiB", "upload cache MiB"],
        sizes,
        title=f"Index of {n:,} games ({info['source']}), per strategy; an upload keeps its sketch and checkpoint "
        "in the page cache",
    )
    limited = runs.get(args.limit_mib) if args.limit_mib else None
    shown, baseline = (limited, runs[0]) if limited else (runs[0], None)  # no limited run: no baseline, no verdict
    rows = [
        [f"exact top-100 table, {TABLE_STRATEGY}, CPU (s)", tables["full"], tables["baseline"], f"{base:,} games"],
        ["launch to first /health, every strategy (s)", whole, None, ""],
    ]
    for name, key, i in (
        (f"launch to first /health, {args.serve} (s)", "startup", None),
        (UPLOAD_ROW, "upload", None),
        ("upload search stage, median (ms)", "search", None),
        ("GET /match p50 (ms)", "lookups", 0),
        ("GET /match p99 (ms)", "lookups", 1),
        ("GET /apps?q= p50 (ms)", "names", 0),
        ("GET /apps?q= p99 (ms)", "names", 1),
        ("total PSS at the end (MiB)", "pss", None),
        ("of which anonymous (MiB)", "anon", None),
    ):
        figure = [None if run is None else run[key] if i is None else run[key][i] for run in (shown, baseline)]
        rows.append([name, *figure, "no limit" if baseline else ""])
    for row in rows:
        row.insert(3, row[1] / row[2] if row[2] else None)
    if limited:
        rows.append([f"cgroup peak, {args.limit_mib} MiB limit (MiB)", limited["peak"], None, None, ""])
        rows.append(["OOM kills", float(limited["oom"]), None, None, ""])
    print()
    print_table(
        ["figure", f"{n:,} games", "baseline", "ratio", "baseline is"],
        rows,
        title=f"{args.serve} served by 2 workers: "
        + (f"in the {args.limit_mib} MiB cgroup, and the baseline without a limit" if limited else "without a limit")
        + f"; tables extrapolated from the first {tables['rows']:,} rows",
    )
    for name, value, _, of_baseline, baseline_is in rows:
        res.add(name, float(value))
        if of_baseline is not None:
            target = ("<= 1.5", of_baseline <= 1.5) if limited and name == UPLOAD_ROW else ()
            res.add(f"{name}: this / {baseline_is}", of_baseline, "x", *target)
    if not limited:
        print("verdict: none (no memory limit was measured)")
        return
    ratio = limited["upload"] / baseline["upload"]
    print(
        f"verdict: upload median in the cgroup {ratio:.2f}x the one without a limit (target <= 1.5x): "
        f"{'PASS' if ratio <= 1.5 else 'MISS'}"
    )


if __name__ == "__main__":
    main()
