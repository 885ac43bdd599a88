"""Start-up time and memory of the real service on a 1 GiB dyno: master and workers, tables and weights shared.

    python -m bench.memory [--backbones B16] [--uploads 16] [--get-requests 2000] [--limit-mib 1024]
                           [--apps N] [--quick] [--json PATH]

The real service (gunicorn, 2 workers, default settings) over the synthetic index of the whole catalog
with all eight strategies (random full-size checkpoints in a temporary TORCH_HOME), inside a cgroup v1
memory group limited to ``--limit-mib`` (a 1 GB dyno; 0 or no cgroup here: no limit). Measures the
time from launch to the first /health answer (target <= 10 s), then RSS, PSS and USS (private) of the
master and of each worker, from /proc/<pid>/smaps_rollup, and the same for the memory-mapped index
files alone (from /proc/<pid>/smaps): at start, after GET /match traffic over every strategy, and after
``--uploads`` concurrent uploads on Complex<backbone>, half held by each worker's keep-alive connections
(found through /proc/net/tcp), so both workers load and run the model. Then the cgroup's peak usage
and the OOM killer's kills (target: none; total PSS after the uploads <= 900 MiB).
"""

from __future__ import annotations

import argparse
import http.client
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    QUICK_APPS,
    Results,
    add_index_options,
    base_parser,
    chosen_backbones,
    load_apps,
    machine_line,
    memory_of,
    pin_many,
    print_table,
    running_server,
    service_workspace,
)
from bench.upload import post
from devtools.cgroup import MemoryCgroup

STARTUP_TARGET_S = 10.0
PSS_TARGET_MIB = 900.0


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> None:
    headers = {"Content-Type": "image/jpeg"} if body else {}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")


def upload_round(srv, pids: list[int], strategy: str, bodies: list[bytes]) -> list[tuple]:
    """Every body uploaded at once, half on each worker's keep-alive connections: ``bench.upload.post``'s answers."""
    conns = [c for cs in pin_many(srv, pids, max(1, len(bodies) // 2)).values() for c in cs]
    with ThreadPoolExecutor(len(conns)) as pool:
        timed = list(pool.map(lambda i: post(conns[i], strategy, bodies[i]), range(len(conns))))
    for c in conns:
        c.close()
    return timed


def main() -> None:
    args = parse_args()
    codes = chosen_backbones(args)
    res = Results("memory")
    print(machine_line(), flush=True)
    cgroup = memory_limit(args.limit_mib)
    with service_workspace(args, codes) as (ws, params, logs):
        size = sum(f.stat().st_size for f in ws.index.rglob("*.npy")) / 2**20
        print(
            f"index: {params['apps']:,} apps, {len(params['strategies'])} strategies, {size:.0f} MiB of tables",
            flush=True,
        )
        try:
            # default settings but one: the uploads queued behind others may wait past the default 10 s on a
            # loaded machine and get 503 busy by design; what is measured here is memory
            env = ws.server_env(UPLOAD_QUEUE_TIMEOUT="300")
            with running_server(env, logs, "memory", cgroup=cgroup) as srv:
                startup = srv.startup_s
                bodies = [ws.upload_jpeg(7 + i) for i in range(max(2, args.uploads))]  # at least one per worker
                rows, snaps, replaced = measure(srv, ws.index, params["strategies"], codes, bodies, args)
        finally:
            peak = cgroup.peak() / 2**20 if cgroup else None
            kills = cgroup.oom_kills() if cgroup else None
            if cgroup:
                cgroup.remove()
    report(res, rows, snaps, size, startup, peak, kills, replaced, args)


def parse_args() -> argparse.Namespace:
    p = base_parser(__doc__.splitlines()[0])
    add_index_options(p, backbones=True)
    p.set_defaults(backbones="B16")
    p.add_argument("--get-requests", type=int, default=2000, help="GET /match requests per worker")
    p.add_argument("--uploads", type=int, default=16, help="concurrent uploads per backbone, half per worker")
    p.add_argument("--limit-mib", type=int, default=1024, help="memory limit of the cgroup (0: none)")
    args = p.parse_args()
    if args.quick:
        args.apps, args.get_requests, args.uploads = args.apps or QUICK_APPS, 100, 2
    return args


def memory_limit(limit_mib: int) -> MemoryCgroup | None:
    """A memory group limited to ``limit_mib`` MiB, or None (no limit asked, or no cgroup here: said why)."""
    why = MemoryCgroup.unavailable() if limit_mib else "no limit asked"
    cgroup = None if why else MemoryCgroup(limit_mib * 2**20)
    print(f"memory limit: {f'{limit_mib} MiB (cgroup v1)' if cgroup else f'none ({why})'}", flush=True)
    return cgroup


def measure(
    srv, index: Path, strategies: list[str], codes: list[str], bodies: list[bytes], args
) -> tuple[list, dict, bool]:
    """The memory table's rows and each phase's snapshot (start, after the GETs, after each backbone's
    uploads), and whether gunicorn replaced a worker meanwhile."""
    pids = srv.workers(expect=2)
    if len(pids) != 2:
        raise RuntimeError(f"expected 2 workers, found {pids}")
    pinned = pin_many(srv, pids, max(1, args.uploads // 2))
    if sorted(pinned) != sorted(pids):
        raise RuntimeError(f"could not reach every worker with a connection ({sorted(pinned)} of {pids})")
    procs = [("master", srv.pid)] + [(f"worker {i + 1}", pid) for i, pid in enumerate(pids)]
    rows, snaps = [], {}
    snapshot("start", procs, index, rows, snaps)
    rng = random.Random(0)
    appids = [a["appid"] for a in load_apps(index)]
    for i in range(args.get_requests):  # the workers in turn: no pinned connection idles past keep-alive
        strategy = strategies[i % len(strategies)]
        for conns in pinned.values():
            request(conns[0], "GET", f"/match/{rng.choice(appids)}?strategy={strategy}&k=10")
    snapshot("after GETs", procs, index, rows, snaps)
    for code in codes:
        upload_round(srv, pids, f"Complex{code}", bodies[: 2 * max(1, args.uploads // 2)])  # fresh connections
        snapshot(f"+ {code} upload", procs, index, rows, snaps)
    return rows, snaps, srv.workers() != pids


def snapshot(phase: str, procs: list[tuple[str, int]], index: Path, rows: list, snaps: dict) -> None:
    """Each process's memory now, into ``snaps[phase]`` and the table's rows (and the total PSS)."""
    snaps[phase] = {name: memory_of(pid, index) for name, pid in procs}
    for name, _ in procs:
        m = snaps[phase][name]
        row = [m["rss"], m["pss"], m["uss"], m["anon"], m["tables_rss"], m["tables_pss"], m["tables_uss"]]
        rows.append([phase, name, *row])
    total = sum(m["pss"] for m in snaps[phase].values())
    rows.append([phase, "total PSS", None, total, None, None, None, None, None])


def report(res, rows, snaps, size, startup, peak, kills, replaced, args) -> None:
    """``startup``: seconds from launch to the first /health 200."""
    print()
    print_table(
        ["phase", "process", "RSS MiB", "PSS MiB", "USS MiB", "anon MiB", "tables RSS", "tables PSS", "tables USS"],
        rows,
        title=f"Memory of the service (2 workers; tables = the mapped index files, {size:.0f} MiB on disk)",
    )
    ok = startup <= STARTUP_TARGET_S
    print(
        f"verdict: launch to first /health answer {startup:.2f} s (target <= {STARTUP_TARGET_S:g} s, no model "
        f"loaded): {'PASS' if ok else 'MISS'}"
    )
    last = snaps[list(snaps)[-1]]
    after_get = snaps["after GETs"]
    w1, w2 = after_get["worker 1"], after_get["worker 2"]
    shared = w2["tables_uss"] < 0.05 * max(w2["tables_rss"], 1e-9) + 1.0
    print(
        f"tables: each worker maps {w1['tables_rss']:.0f} / {w2['tables_rss']:.0f} MiB of them after the GETs, "
        f"of which private (USS) {w1['tables_uss']:.1f} / {w2['tables_uss']:.1f} MiB: "
        f"{'shared (page cache)' if shared else 'NOT shared'}"
    )
    total = sum(m["pss"] for m in last.values())
    if peak is not None:
        print(
            f"cgroup ({args.limit_mib} MiB): peak {peak:.0f} MiB, OOM kills {kills}, "
            f"workers replaced: {'yes' if replaced else 'no'}"
        )
    res.add("launch to first /health (no models)", startup, "s", f"<= {STARTUP_TARGET_S:g} s", ok)
    res.add("master RSS at start", snaps["start"]["master"]["rss"], "MiB")
    res.add("worker RSS at start (max)", max(snaps["start"][w]["rss"] for w in ("worker 1", "worker 2")), "MiB")
    res.add("tables private to the 2nd worker (USS)", w2["tables_uss"], "MiB", "~0 (shared)", shared)
    res.add("total PSS after GETs", sum(m["pss"] for m in after_get.values()), "MiB")
    res.add(
        f"total PSS after {args.uploads} concurrent uploads ({'+'.join(chosen_backbones(args))})",
        total,
        "MiB",
        f"<= {PSS_TARGET_MIB:g} MiB",
        total <= PSS_TARGET_MIB,
    )
    res.add("worker USS after uploads (max)", max(last[w]["uss"] for w in ("worker 1", "worker 2")), "MiB")
    if peak is not None:
        res.add(f"cgroup peak ({args.limit_mib} MiB limit)", peak, "MiB")
        res.add("OOM kills in the cgroup", float(kills), "", "0", kills == 0 and not replaced)
    res.write(args.json)


if __name__ == "__main__":
    main()
