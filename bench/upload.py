"""Latency of POST /match (an uploaded banner embedded on demand) per backbone, split by stage.

    python -m bench.upload [--backbones S16,S8,B16,B8] [--requests 3] [--apps N] [--quick] [--json PATH]

The real service (gunicorn, 2 workers, TORCH_THREADS = cores / workers) over the synthetic index of
the whole catalog, with random full-size checkpoints in a temporary TORCH_HOME whose sha256 the
manifest records. Per backbone, the Complex strategy: one warm-up upload (it loads the model in the
worker), then a few uploads of different 300x450 JPEG banners on the same keep-alive connection (so
the same worker), each split into decode, preprocess, forward and search from the Server-Timing
header, plus the round trip seen by the client.
"""

from __future__ import annotations

import http.client
import json
import os
import time

import numpy as np

from bench.common import (
    QUICK_APPS,
    Results,
    add_index_options,
    base_parser,
    chosen_backbones,
    connection_owner,
    machine_line,
    print_table,
    running_server,
    service_workspace,
)
from devtools.clients import parse_server_timing


def torch_threads() -> int:
    """What gunicorn.conf.py's post_fork gives each of the 2 workers when TORCH_THREADS is not set."""
    if os.environ.get("TORCH_THREADS"):
        return int(os.environ["TORCH_THREADS"])
    from core.cpu import cpu_cores

    return max(1, cpu_cores() // 2)


STAGES = ("decode", "preprocess", "forward", "search")


def post(conn: http.client.HTTPConnection, strategy: str, body: bytes, k: int = 10) -> tuple[dict, dict, float]:
    t0 = time.perf_counter()
    conn.request("POST", f"/match?strategy={strategy}&k={k}", body=body, headers={"Content-Type": "image/jpeg"})
    r = conn.getresponse()
    data = r.read()
    rtt = (time.perf_counter() - t0) * 1e3
    if r.status != 200:
        raise RuntimeError(f"POST /match?strategy={strategy}: {r.status} {data[:300]!r}")
    payload = json.loads(data)
    if len(payload["matches"]) != k:
        raise RuntimeError(f"POST /match?strategy={strategy}: {len(payload['matches'])} matches, expected {k}")
    return parse_server_timing(r.getheader("Server-Timing")), payload, rtt


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_index_options(p, backbones=True)
    p.add_argument("--requests", type=int, default=3, help="timed uploads per backbone, after one warm-up")
    args = p.parse_args()
    codes = chosen_backbones(args)
    if args.quick:
        args.apps, args.requests = args.apps or QUICK_APPS, 1
    res = Results("upload")
    print(machine_line(), flush=True)
    rows, searches = [], []
    with service_workspace(args, codes) as (ws, params, logs):
        print(
            f"index: {params['apps']:,} apps, {len(params['strategies'])} strategies; checkpoints: random, "
            f"{', '.join(codes)}",
            flush=True,
        )
        with running_server(ws.server_env(), logs, "upload") as srv:
            pids = srv.workers(expect=2)
            bodies = [ws.upload_jpeg(seed) for seed in range(args.requests + 1)]
            for code in codes:
                row, times = measure(srv, pids, f"Complex{code}", bodies, res)
                rows.append(row)
                searches.extend(times)
    print()
    report(rows, searches, params["apps"], res)
    res.write(args.json)


def measure(srv, pids: list[int], strategy: str, bodies: list[bytes], res: Results) -> tuple[list, list[float]]:
    """One warm-up upload of ``bodies[0]`` (it loads the model), then the others, timed, on the same
    keep-alive connection: the table's row and each upload's search time."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=600)
    _, _, first = post(conn, strategy, bodies[0])  # loads the model in this worker
    port = conn.sock.getsockname()[1]
    worker = connection_owner(srv.port, port, pids)
    timings, rtts = [], []
    requests = len(bodies) - 1
    for body in bodies[1:]:
        t, _, rtt = post(conn, strategy, body)
        timings.append(t)
        rtts.append(rtt)
    same = conn.sock is not None and conn.sock.getsockname()[1] == port
    conn.close()
    med = {s: float(np.median([t.get(s, np.nan) for t in timings])) for s in STAGES}
    rtt = float(np.median(rtts))
    searches = [t.get("search", np.nan) for t in timings]
    row = [
        strategy,
        requests,
        first / 1e3,
        *(med[s] for s in STAGES),
        max(searches),
        sum(med.values()),
        rtt,
        f"{worker}{'' if same else ' (reconnected)'}",
    ]
    res.add(f"POST /match {strategy} round trip (median)", rtt, "ms")
    res.add(f"POST /match {strategy} forward (median)", med["forward"], "ms")
    res.add(f"POST /match {strategy} search (median)", med["search"], "ms")
    return row, searches


def report(rows: list, searches: list[float], apps: int, res: Results) -> None:
    print_table(
        [
            "strategy",
            "n",
            "first (s)",
            "decode ms",
            "preprocess ms",
            "forward ms",
            "search ms",
            "search max",
            "server ms",
            "round trip ms",
            "worker",
        ],
        rows,
        title=f"POST /match (raw image/jpeg 300x450, k=10) over {apps:,} rows, 2 workers, "
        f"{torch_threads()} torch thread(s) each; medians of n after one warm-up "
        "('first': that warm-up, model load included)",
    )
    worst = max(searches) if searches else float("nan")
    typical = float(np.median(searches)) if searches else float("nan")
    print(f"search over {apps:,} rows: median {typical:.2f} ms of {len(searches)} uploads; worst {worst:.2f} ms")
    res.add(f"POST /match search, median of all ({apps:,} rows)", typical, "ms")
    res.add("POST /match search, worst of all", worst, "ms")


if __name__ == "__main__":
    main()
