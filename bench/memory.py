"""Start-up time and memory of the real service: master and workers, tables shared, one model per backbone.

    python -m bench.memory [--backbones S16,S8,B16,B8] [--get-requests 2000] [--apps N] [--quick] [--json PATH]

The real service (gunicorn, 2 workers) over the synthetic index of the whole catalog with all eight
strategies (random full-size checkpoints in a temporary TORCH_HOME). Measures the time from launch
to the first /health answer (no model is loaded at start; target < 5 s), then RSS, PSS and USS
(private) of the master and of each worker, from /proc/<pid>/smaps_rollup, and the same for the
memory-mapped index files alone (from /proc/<pid>/smaps): at start, after GET /match traffic over
every strategy, and after the first upload per backbone in each worker. One keep-alive connection is
held by each worker (found through /proc/net/tcp), so each worker surely gets the traffic and an
upload per backbone (each worker loads one model per backbone).
"""

from __future__ import annotations

import http.client
import random
import tempfile
from pathlib import Path

from bench.common import (
    QUICK_APPS,
    Results,
    Workspace,
    add_index_options,
    banner_jpeg,
    base_parser,
    chosen_backbones,
    load_apps,
    machine_line,
    memory_of,
    pin_connections,
    print_table,
    running_server,
)

ROOT = Path(__file__).resolve().parent.parent

STARTUP_TARGET_S = 5.0


def request(conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None = None) -> None:
    headers = {"Content-Type": "image/jpeg"} if body else {}
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise RuntimeError(f"{method} {path}: {r.status} {data[:300]!r}")


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_index_options(p, backbones=True)
    p.add_argument("--get-requests", type=int, default=2000, help="GET /match requests per worker")
    args = p.parse_args()
    codes = chosen_backbones(args)
    if args.quick:
        args.apps, args.get_requests = args.apps or QUICK_APPS, 100
    res = Results("memory")
    print(machine_line(), flush=True)
    with Workspace(args.workdir) as ws, tempfile.TemporaryDirectory() as logs:
        ws.ensure_checkpoints(codes)
        params = ws.ensure_index(args.apps)
        size = sum(f.stat().st_size for f in ws.index.rglob("*.npy")) / 2**20
        print(
            f"index: {params['apps']:,} apps, {len(params['strategies'])} strategies, {size:.0f} MiB of tables",
            flush=True,
        )
        rows, snaps = [], {}
        with running_server(ws.server_env(), Path(logs), "memory") as srv:
            startup = srv.startup_s
            pids = srv.workers(expect=2)
            if len(pids) != 2:
                raise RuntimeError(f"expected 2 workers, found {pids}")
            conns = pin_connections(srv, pids)
            if len(conns) != len(pids):
                raise RuntimeError(f"could not reach every worker with a connection ({sorted(conns)} of {pids})")
            procs = [("master", srv.pid)] + [(f"worker {i + 1}", pid) for i, pid in enumerate(pids)]

            def snapshot(phase: str) -> None:
                snaps[phase] = {name: memory_of(pid, ws.index) for name, pid in procs}
                for name, _ in procs:
                    m = snaps[phase][name]
                    rows.append(
                        [phase, name, m["rss"], m["pss"], m["uss"], m["tables_rss"], m["tables_pss"], m["tables_uss"]]
                    )
                total = sum(m["pss"] for m in snaps[phase].values())
                rows.append([phase, "total PSS", None, total, None, None, None, None])

            snapshot("start")
            rng = random.Random(0)
            appids = [a["appid"] for a in load_apps(ws.index)]
            for conn in conns.values():
                for i in range(args.get_requests):
                    strategy = params["strategies"][i % len(params["strategies"])]
                    request(conn, "GET", f"/match/{rng.choice(appids)}?strategy={strategy}&k=10")
            snapshot("after GETs")
            for code in codes:
                for conn in conns.values():
                    request(conn, "POST", f"/match?strategy=Complex{code}&k=10", banner_jpeg(7))
                snapshot(f"+ {code} upload")
            for conn in conns.values():
                conn.close()

    print()
    print_table(
        ["phase", "process", "RSS MiB", "PSS MiB", "USS MiB", "tables RSS", "tables PSS", "tables USS"],
        rows,
        title=f"Memory of the service (2 workers; tables = the mapped index files, {size:.0f} MiB on disk)",
    )
    ok = startup < STARTUP_TARGET_S
    print(
        f"verdict: launch to first /health answer {startup:.2f} s (target < {STARTUP_TARGET_S:g} s, no model "
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
    res.add("launch to first /health (no models)", startup, "s", "< 5 s", ok)
    res.add("master RSS at start", snaps["start"]["master"]["rss"], "MiB")
    res.add("worker RSS at start (max)", max(snaps["start"][w]["rss"] for w in ("worker 1", "worker 2")), "MiB")
    res.add("tables private to the 2nd worker (USS)", w2["tables_uss"], "MiB", "~0 (shared)", shared)
    res.add("total PSS after GETs", sum(m["pss"] for m in after_get.values()), "MiB")
    res.add(f"total PSS after uploads ({'+'.join(codes)})", sum(m["pss"] for m in last.values()), "MiB")
    res.add("worker USS after uploads (max)", max(last[w]["uss"] for w in ("worker 1", "worker 2")), "MiB")
    res.write(args.json)


if __name__ == "__main__":
    main()
