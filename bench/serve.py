"""Requests/s and latency of GET /match/<appid> on the real service, against a bare Flask app, cold and warm;
then beside 64 slow clients and beside 32 uploaders.

    python -m bench.serve [--apps N] [--duration 10] [--connections 8] [--client auto|wrk|python]
                          [--uploaders 32] [--slow-clients 64] [--slow-interval 1]
                          [--quick] [--json PATH]

The real service (gunicorn, gunicorn.conf.py, 2 workers) over a synthetic index of the whole catalog
(29,982 games, k=100, random tables), loaded from 127.0.0.1 with ``GET /match/<appid>?k=10`` over
random appids (the default strategy), by wrk when installed (a Lua script spreads the appids), else
by a bounded Python client (keep-alive connections in threads; --quick always uses it). Every answer
must succeed, and for a sample of appids and every strategy the matches must equal the tables.

Baseline, in the same run and with the same load: the bare app (``bench/naive_service.py``: the same
JSON from in-memory arrays with nothing else) under gunicorn's sync workers
(``bench/naive_gunicorn.conf.py``), the framework's floor.

Phases, each reported as a ratio to the baseline measured in the same run:
1. cold: each service is started and loaded the moment its ``/health`` first answers 200 (one run of
   fresh connections: where they land decides the figure);
2. warm: once the master has imported torch and replaced our workers with ones that share it
   (serving/refresh.py: during the cold phase or soon after), and after a warm-up, in rounds of fresh
   connections (the split of connections per worker shown);
3. beside slow clients: half sending a header line, half a body byte, every second (--slow-clients);
4. beside uploaders: --uploaders threads posting banners (ViT-S/16) back to back, waiting only when
   answered 503 (for its Retry-After); lookups compared with ours warm.
Targets (issues #15 and #12): ours >= 1.0x the baseline's requests/s cold and warm, with p99 <= 1.5x
the baseline's; beside slow clients every lookup within 1 s; beside uploaders >= 50% of the warm
requests/s and p99 < 50 ms.
"""

from __future__ import annotations

import http.client
import math
import os
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
from bench.pressure import SlowClients, Uploaders
from serving.env import preload_torch

ROOT = Path(__file__).resolve().parent.parent


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


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    add_index_options(p, backbones=False)
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections")
    p.add_argument("--duration", type=float, default=6.0, help="wrk: seconds of load per phase and service")
    p.add_argument("--rounds", type=int, default=3, help="warm phase: load runs, each with fresh connections")
    p.add_argument("--requests", type=int, default=6000, help="python client: requests per phase and service")
    p.add_argument("--timeout", type=float, default=10.0, help="wrk: request timeout (s)")
    p.add_argument("--verify", type=int, default=25, help="appids whose answers are checked, for every strategy")
    p.add_argument("--slow-clients", type=int, default=64, help="slow clients of phase 3")
    p.add_argument("--slow-interval", type=float, default=1.0, help="seconds between the slow clients' bytes")
    p.add_argument("--uploaders", type=int, default=32, help="uploaders of phase 4")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.apps = args.apps or QUICK_APPS
        args.duration, args.requests, args.verify, args.rounds = 1, 100, 2, 1
        args.slow_clients, args.slow_interval, args.uploaders = 4, 0.25, 2
    client = args.client
    if client == "auto":  # --quick: the Python client, the fallback that must work where wrk is missing
        client = "wrk" if shutil.which("wrk") and not args.quick else "python"
    elif client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not installed (apt-get install wrk), use --client python")
    return args, client


def start_cold(env: dict, log: Path, client: str, paths: list[str], args, **server) -> tuple[Server, dict]:
    """Start a service and load it the moment its /health first answers 200 (fresh connections)."""
    srv = Server(env, log, **server)
    try:
        srv.startup_s = srv.wait_ready()
        return srv, load(srv, client, paths, args, args.duration, args.requests, 1)
    except BaseException:
        srv.stop()
        raise


def measure(ws: Workspace, logs: Path, client: str, paths: list[str], sample: list[int], args) -> dict:
    """The four phases (see the module's docstring): each phase's load figures by name."""
    out: dict = {}
    ours_env = ws.server_env(PRELOAD_MODELS="SimpleS16")  # ready means ready: the upload model too
    ours, out["ours cold"] = start_cold(ours_env, logs / "ours.log", client, paths, args)
    bare = None
    try:
        bare_conf = {"app": "bench.naive_service:app", "config": "bench/naive_gunicorn.conf.py"}
        bare, out["bare cold"] = start_cold(ws.server_env(), logs / "bare.log", client, paths, args, **bare_conf)
        if preload_torch({**os.environ, **ours_env}):  # warm: the workers' refresh (serving/refresh.py) is over
            shared = ours.wait_torch_shared()
            print(f"ours: first /health 200 {ours.startup_s:.2f} s after launch; all share torch at {shared:.1f} s")
        for srv in (ours, bare):  # warm-up
            load(srv, client, paths, args, 1.0, min(1000, args.requests // 5))
        out["ours warm"] = load(ours, client, paths, args, args.duration, args.requests, args.rounds)
        out["bare warm"] = load(bare, client, paths, args, args.duration, args.requests, args.rounds)
        with SlowClients(ours.host, ours.port, args.slow_clients, args.slow_interval) as slow:
            out["ours beside slow clients"] = load(ours, client, paths, args, args.duration, args.requests)
        out["ours beside slow clients"]["note"] = f"{args.slow_clients} slow clients ({dict(slow.counts)})"
        with Uploaders(ours.host, ours.port, args.uploaders, ws.upload_jpeg(7)) as up:
            out["ours beside uploaders"] = load(ours, client, paths, args, args.duration, args.requests)
        out["ours beside uploaders"]["note"] = f"{args.uploaders} uploaders, answered {dict(sorted(up.counts.items()))}"
        index = ws.index
        out["checked"] = verify_matches(
            ours.url, index, sample, sorted(p.parent.name for p in index.glob("*/neighbours.npy"))
        )
    finally:
        ours.stop()
        if bare is not None:
            bare.stop()
    return out


def main() -> None:
    args, client = parse_args()
    res = Results("serve")
    print(machine_line(), flush=True)
    with Workspace(args.workdir) as ws, tempfile.TemporaryDirectory() as logs:
        params = ws.ensure_index(args.apps)
        ws.ensure_checkpoints(["S16"])
        rng = random.Random(args.seed)
        appids = [a["appid"] for a in load_apps(ws.index)]
        paths = [f"/match/{rng.choice(appids)}?k=10" for _ in range(min(20000, 4 * len(appids)))]
        sample = rng.sample(appids, min(args.verify, len(appids)))
        gen = (
            f"wrk, 1 thread, {args.connections} connections, {args.duration:g} s per phase"
            if client == "wrk"
            else f"python client, {args.connections} keep-alive connections, {args.requests:,} requests per phase"
        )
        print(f"index: {params['apps']:,} apps, {len(params['strategies'])} strategies; load: {gen}", flush=True)
        out = measure(ws, Path(logs), client, paths, sample, args)
    report(res, out, params, gen)
    res.write(args.json)


def report(res: Results, out: dict, params: dict, gen: str) -> None:
    conf = gunicorn_settings({"WEB_CONCURRENCY": "2"})
    names = [n for n in out if isinstance(out[n], dict)]
    keys = ("requests", "rps", "p50_ms", "p99_ms", "max_ms", "non200", "errors", "split")
    print()
    print_table(
        ["phase", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "bad status", "errors", "conns/worker"],
        [[n, *(out[n][k] for k in keys)] for n in names],
        title=f"GET /match/<appid>?k=10, random appids of {params['apps']:,}; ours: {conf['worker_class']}, "
        f"{conf['workers']} workers; bare: bench/naive_service.py, sync workers; load: {gen}",
    )
    for n in names:
        if out[n].get("note"):
            print(f"{n}: {out[n]['note']}")
    for mode in ("cold", "warm"):
        ours, bare = out[f"ours {mode}"], out[f"bare {mode}"]
        ratio = ours["rps"] / bare["rps"] if bare["rps"] else float("inf")
        p99 = ours["p99_ms"] / bare["p99_ms"] if bare["p99_ms"] else float("inf")
        res.add(f"GET /match {mode}: ours / bare req/s", ratio, "x", ">= 1.0x", ratio >= 1.0, note=ours["split"])
        res.add(f"GET /match {mode}: ours / bare p99", p99, "x", "<= 1.5x", p99 <= 1.5)
        res.add(f"GET /match {mode}: p99 ours, bare", f"{ours['p99_ms']:.1f}, {bare['p99_ms']:.1f}", "ms")
        res.add(f"GET /match {mode}: req/s ours, bare", f"{ours['rps']:,.0f}, {bare['rps']:,.0f}", "req/s")
    slow = out["ours beside slow clients"]
    res.add("GET /match beside slow clients: max latency", slow["max_ms"], "ms", "< 1000 ms", slow["max_ms"] < 1000)
    up, warm = out["ours beside uploaders"], out["ours warm"]
    kept = up["rps"] / warm["rps"] if warm["rps"] else 0.0
    res.add("GET /match beside uploaders: req/s / warm", kept, "x", ">= 0.5x", kept >= 0.5, note=up["note"])
    res.add("GET /match beside uploaders: p99", up["p99_ms"], "ms", "< 50 ms", up["p99_ms"] < 50)
    bad = sum(out[n]["non200"] + out[n]["errors"] for n in names if n.startswith("ours"))
    res.add("GET /match non-200 or errors (ours, all phases)", bad, "", "0", bad == 0)
    res.add("GET /match answers equal the tables", out["checked"], "checked", "all", True)
    print()
    for f in res.figures:
        verdict = f" (target {f.target}: {'PASS' if f.passed else 'MISS'})" if f.target else ""
        print(f"{f.name}: {f.shown()}{verdict}")


if __name__ == "__main__":
    main()
