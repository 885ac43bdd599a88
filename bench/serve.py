"""Requests/s and latency of GET /match/<appid> on the real service, against a naive design.

    python -m bench.serve [--apps N] [--duration 10] [--connections 8] [--client auto|wrk|python]
                          [--requests 20000] [--naive-duration 5] [--quick] [--json PATH]

The real service (gunicorn, gunicorn.conf.py, 2 workers) over a synthetic index of the whole catalog
(29,982 games, the eight original strategies, k=100, random tables), loaded from 127.0.0.1 with
``GET /match/<appid>?k=10`` over random appids of the catalog (the default strategy). The load
generator is wrk when installed (a Lua script spreads the appids), else a bounded Python client
(keep-alive connections in threads, a fixed number of requests); the table says which, and --quick
always uses the Python client. Every answer must succeed ("bad status": wrk's non-2xx/3xx count, the
Python client's non-200 count; "errors": connection errors and timeouts), and for a sample of
appids and every strategy the matches must equal the tables.

The load runs in rounds (3 by default), each with fresh connections: gunicorn's workers race to
accept connections and a keep-alive connection stays with the worker that took it, so one run's
split (often 8/0 or 7/1 with 8 connections) sways its figure. Reported: requests/s over all rounds,
the median round's p50, the worst round's p99 and max, and each round's split ("conns/worker").

Baseline, in the same run and with the same load: ``bench/naive_service.py`` under the same gunicorn
settings, which reads apps.json and the tables from disk and scans the app list on every request.
Target for ours: >= 2,000 requests/s with p99 < 20 ms on a 2-core machine.
"""

from __future__ import annotations

import http.client
import math
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import (
    QUICK_APPS,
    Results,
    Server,
    Workspace,
    add_index_options,
    base_parser,
    connections_per_worker,
    gunicorn_settings,
    load_apps,
    machine_line,
    percentile,
    print_table,
    verify_matches,
)

ROOT = Path(__file__).resolve().parent.parent

TARGET_RPS = 2000
TARGET_P99_MS = 20.0

WRK_SCRIPT = """
local paths = {%s}
local n = #paths
math.randomseed(%d)
request = function()
  return wrk.format("GET", paths[math.random(n)])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%%d duration_us=%%d status=%%d connect=%%d read=%%d write=%%d timeout=%%d " ..
    "p50_us=%%d p99_us=%%d max_us=%%d\\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def run_wrk(url: str, paths: list[str], duration: float, connections: int, timeout_s: float, seed: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(WRK_SCRIPT % (",".join(f'"{p}"' for p in paths), seed))
        script = f.name
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, math.ceil(duration))}s", f"--timeout={timeout_s:g}s"]
    out = subprocess.run([*cmd, "-s", script, url], capture_output=True, text=True, check=True).stdout
    Path(script).unlink()
    m = re.search(r"BENCH (.*)", out)
    if not m:
        raise RuntimeError(f"wrk printed no summary:\n{out}")
    v = {k: int(x) for k, x in (kv.split("=") for kv in m.group(1).split())}
    seconds = v["duration_us"] / 1e6
    return {
        "requests": v["requests"],
        "seconds": seconds,
        "rps": v["requests"] / seconds,
        "p50_ms": v["p50_us"] / 1e3,
        "p99_ms": v["p99_us"] / 1e3,
        "max_ms": v["max_us"] / 1e3,
        "non200": v["status"],
        "errors": v["connect"] + v["read"] + v["write"] + v["timeout"],
    }


def run_python_client(host: str, port: int, paths: list[str], total: int, connections: int, seed: int) -> dict:
    """A bounded client: `connections` threads, each with one keep-alive connection, `total` requests."""
    latencies: list[float] = []
    counts = {"non200": 0, "errors": 0}
    lock = threading.Lock()

    def worker(i: int, n: int) -> None:
        rng = random.Random(seed + i)
        conn = http.client.HTTPConnection(host, port, timeout=30)
        mine, non200, errors = [], 0, 0
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                conn.request("GET", rng.choice(paths))
                r = conn.getresponse()
                r.read()
                non200 += r.status != 200
            except (OSError, http.client.HTTPException):
                errors += 1
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)
            counts["non200"] += non200
            counts["errors"] += errors

    shares = [total // connections + (i < total % connections) for i in range(connections)]
    threads = [threading.Thread(target=worker, args=(i, n)) for i, n in enumerate(shares)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    ms = [x * 1e3 for x in latencies]
    return {
        "requests": len(ms),
        "seconds": seconds,
        "rps": len(ms) / seconds,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        **counts,
    }


def load_round(srv, client: str, paths: list[str], args, duration: float, total: int, seed: int) -> dict:
    """One run of the load generator; meanwhile, note how its connections are split between the workers
    (gunicorn's workers race to accept them, and a keep-alive connection stays with its worker)."""
    pids = srv.workers()
    splits: list[list[int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.25):
            split = connections_per_worker(srv.port, pids)
            if sum(split):
                splits.append(split)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        if client == "wrk":
            out = run_wrk(srv.url, paths, duration, args.connections, args.timeout, seed)
        else:
            out = run_python_client(srv.host, srv.port, paths, total, args.connections, seed)
    finally:
        stop.set()
        sampler.join()
    common = max(splits, key=splits.count) if splits else []
    out["split"] = "/".join(map(str, sorted(common, reverse=True))) or "-"
    return out


def load(srv, client: str, paths: list[str], args, duration: float, total: int, rounds: int = 1) -> dict:
    """The load in `rounds` runs with fresh connections each (so that one unlucky split of the
    connections between the workers does not decide the figure): requests/s over all of them, the
    median round's p50 and the worst round's p99 and max."""
    rounds = max(1, rounds)
    runs = [
        load_round(srv, client, paths, args, duration / rounds, max(1, total // rounds), args.seed + i)
        for i in range(rounds)
    ]
    requests = sum(r["requests"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {
        "requests": requests,
        "seconds": seconds,
        "rps": requests / seconds,
        "p50_ms": float(np.median([r["p50_ms"] for r in runs])),
        "p99_ms": max(r["p99_ms"] for r in runs),
        "max_ms": max(r["max_ms"] for r in runs),
        "non200": sum(r["non200"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "split": " ".join(r["split"] for r in runs),
        "round_rps": [r["rps"] for r in runs],
    }


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    add_index_options(p, backbones=False)
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections")
    p.add_argument("--duration", type=float, default=9.0, help="wrk: seconds of load on ours (all rounds)")
    p.add_argument("--rounds", type=int, default=3, help="load runs, each with fresh connections")
    p.add_argument("--naive-duration", type=float, default=6.0, help="wrk: seconds of load on the naive service")
    p.add_argument("--requests", type=int, default=20000, help="python client: requests to ours")
    p.add_argument("--naive-requests", type=int, default=300, help="python client: requests to the naive service")
    p.add_argument("--timeout", type=float, default=10.0, help="wrk: request timeout (s)")
    p.add_argument("--verify", type=int, default=25, help="appids whose answers are checked, for every strategy")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.apps = args.apps or QUICK_APPS
        args.duration, args.naive_duration, args.requests, args.naive_requests, args.verify = 1, 1, 300, 30, 3
        args.rounds = 1
    client = args.client
    if client == "auto":  # --quick: the Python client, the fallback that must work where wrk is missing
        client = "wrk" if shutil.which("wrk") and not args.quick else "python"
    elif client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not installed (apt-get install wrk), use --client python")
    res = Results("serve")
    conf = gunicorn_settings({"WEB_CONCURRENCY": "2"})
    print(machine_line(), flush=True)
    with Workspace(args.workdir) as ws, tempfile.TemporaryDirectory() as logs:
        params = ws.ensure_index(args.apps)
        apps = load_apps(ws.index)
        rng = random.Random(args.seed)
        appids = [a["appid"] for a in apps]
        paths = [f"/match/{rng.choice(appids)}?k=10" for _ in range(min(20000, 4 * len(appids)))]
        sample = rng.sample(appids, min(args.verify, len(appids)))
        gen = (
            f"wrk, 1 thread, {args.connections} connections, {args.duration:g} s"
            if client == "wrk"
            else f"python client, {args.connections} keep-alive connections, {args.requests:,} requests"
        ) + (f", in {args.rounds} rounds" if args.rounds > 1 else "")
        print(
            f"index: {params['apps']:,} apps, {len(params['strategies'])} strategies, k={params['k']}; load: {gen}",
            flush=True,
        )
        rows = []
        env = ws.server_env()
        # both services start together (start-up is not measured here), then are loaded one after the other
        ours_srv = Server(env, Path(logs) / "ours.log")
        naive_srv = Server(
            env, Path(logs) / "naive.log", app="bench.naive_service:app", config="bench/naive_gunicorn.conf.py"
        )
        try:
            ours_srv.wait_ready()
            naive_srv.wait_ready()
            load(ours_srv, client, paths, args, 1.0, min(1000, args.requests // 10))  # warm-up
            ours = load(ours_srv, client, paths, args, args.duration, args.requests, args.rounds)
            checked = verify_matches(ours_srv.url, ws.index, sample, params["strategies"])
            rows.append(("ours (app/, gunicorn.conf.py)", ours, checked))
            load(naive_srv, client, paths, args, 1.0, args.connections)  # warm-up
            naive = load(naive_srv, client, paths, args, args.naive_duration, args.naive_requests, args.rounds)
            checked_naive = verify_matches(naive_srv.url, ws.index, sample[:3], ["ComplexB16"])
            rows.append(("naive (bench/naive_service.py)", naive, checked_naive))
        finally:
            ours_srv.stop()
            naive_srv.stop()

    print()
    print_table(
        [
            "service",
            "requests",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "bad status",
            "errors",
            "answers = tables",
            "conns/worker",
        ],
        [
            [
                name,
                r["requests"],
                r["rps"],
                r["p50_ms"],
                r["p99_ms"],
                r["max_ms"],
                r["non200"],
                r["errors"],
                checked,
                r["split"],
            ]
            for name, r, checked in rows
        ],
        title=f"GET /match/<appid>?k=10, random appids of {params['apps']:,}, gunicorn {conf['workers']} workers x "
        f"{conf['threads']} threads; load: {gen}",
    )
    ratio = ours["rps"] / naive["rps"] if naive["rps"] else float("inf")
    if args.rounds > 1:
        per_round = ", ".join(f"{r:,.0f}" for r in ours["round_rps"])
        print(f"ours, req/s by round: {per_round} (connections per worker: {ours['split']})")
    ok_rps = ours["rps"] >= TARGET_RPS
    ok_p99 = ours["p99_ms"] < TARGET_P99_MS
    clean = ours["non200"] == 0 and ours["errors"] == 0
    print(f"ours / naive: {ratio:.0f}x the requests/s")
    print(
        f"verdict: {ours['rps']:,.0f} req/s (target >= {TARGET_RPS:,}): {'PASS' if ok_rps else 'MISS'}; "
        f"p99 {ours['p99_ms']:.1f} ms (target < {TARGET_P99_MS:g} ms): {'PASS' if ok_p99 else 'MISS'}; "
        f"all answers 200: {'PASS' if clean else 'MISS'}"
    )
    res.add("GET /match req/s (ours)", ours["rps"], "req/s", f">= {TARGET_RPS:,}", ok_rps, note=client)
    res.add("GET /match p50 (ours)", ours["p50_ms"], "ms")
    res.add("GET /match p99 (ours)", ours["p99_ms"], "ms", f"< {TARGET_P99_MS:g} ms", ok_p99)
    res.add("GET /match non-200 or errors (ours)", ours["non200"] + ours["errors"], "", "0", clean)
    res.add("GET /match answers equal the tables", checked, "checked", "all", True)
    res.add("GET /match req/s (naive baseline)", naive["rps"], "req/s")
    res.add("GET /match p99 (naive baseline)", naive["p99_ms"], "ms")
    res.add("GET /match ours / naive", ratio, "x")
    res.write(args.json)


if __name__ == "__main__":
    main()
