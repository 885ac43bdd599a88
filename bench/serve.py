"""Requests/s and latency of GET /match/<appid> on the real service: alone, beside slow clients, beside uploaders.

    python -m bench.serve [--apps N] [--duration 6] [--connections 8] [--client auto|wrk|python]
                          [--uploaders 4] [--slow-clients 64] [--slow-interval 1] [--visitors 40]
                          [--quick] [--json PATH]

The real service (gunicorn, gunicorn.conf.py, 2 workers) over a synthetic index of the whole catalog
(29,982 games, k=100, random tables), loaded from 127.0.0.1 with ``GET /match/<appid>?k=10`` over
random appids (the default strategy), by wrk when installed (a Lua script spreads the appids), else
by a bounded Python client (keep-alive connections in one thread; --quick always uses it). Every answer
must succeed, and for a sample of appids and every strategy the matches must equal the tables.

Phases, after a warm-up:
1. alone, in rounds of fresh connections (the split of connections per worker shown);
2. beside slow clients: half sending a header line, half a body byte, every second (--slow-clients);
   meanwhile --visitors new visitors, each on a fresh connection, must all be answered;
3. beside uploaders: --uploaders threads posting banners (ViT-S/16) back to back, waiting only when
   answered 503 (for its Retry-After).
Targets: every new visitor answered beside the slow clients; beside the uploaders, p99 <= 10 ms and at
least half the requests/s of the lookups alone.
"""

from __future__ import annotations

import http.client
import math
import random
import re
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

from bench.common import (
    QUICK_APPS,
    Results,
    Workspace,
    add_index_options,
    base_parser,
    connections_per_worker,
    gunicorn_settings,
    load_apps,
    machine_line,
    percentile,
    print_table,
    running_server,
    service_workspace,
    verify_matches,
)
from bench.pressure import SlowClients, Uploaders

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


class _Connection:
    """One keep-alive connection of ``run_python_client``, watched by its selector: what came back so far, and
    when its request in flight was started."""

    def __init__(self, host: str, port: int, sel: selectors.BaseSelector) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sel, self.buf, self.t0 = sel, bytearray(), 0.0
        sel.register(self.sock, selectors.EVENT_READ, self)

    def close(self) -> None:
        self.sel.unregister(self.sock)
        self.sock.close()

    def answer(self) -> tuple[int, bool] | None:
        """(status, whether the server keeps the connection) once the whole answer is in, else None."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).decode("latin-1").lower()
        length = re.search(r"\r\ncontent-length: *(\d+)", head)
        if length is None:
            raise ConnectionError("an answer without Content-Length")
        size = end + 4 + int(length.group(1))
        if len(self.buf) < size:
            return None
        del self.buf[:size]
        return int(head[9:12]), "\r\nconnection: close" not in head


class _Load:
    """``run_python_client``'s state: the requests still to send, and what the answers so far measured."""

    def __init__(self, host: str, port: int, requests: list[bytes]) -> None:
        self.host, self.port = host, port
        self.todo = deque(requests)
        self.latencies: list[float] = []
        self.counts = {"non200": 0, "errors": 0}
        self.sel = selectors.DefaultSelector()

    def start(self, conn: _Connection | None) -> None:
        """The next request, on ``conn`` or on a new connection (whose connect counts in the request's time)."""
        while self.todo:
            request, t0 = self.todo.popleft(), time.perf_counter()
            try:
                conn = conn or _Connection(self.host, self.port, self.sel)
                conn.sock.sendall(request)
                conn.t0 = t0
                return
            except OSError:
                self.counts["errors"] += 1
                self.latencies.append(time.perf_counter() - t0)
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def on_readable(self, conn: _Connection) -> None:
        """Read what came; once an answer is whole, note it and send the next request."""
        try:
            data = conn.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the service")
            conn.buf += data
            answer = conn.answer()
        except BlockingIOError:
            return
        except OSError:
            answer = (0, False)
        if answer is None:
            return
        self.latencies.append(time.perf_counter() - conn.t0)
        status, keep = answer
        self.counts["errors"] += status == 0
        self.counts["non200"] += status not in (0, 200)
        if not keep:
            conn.close()
        self.start(conn if keep else None)


def run_python_client(host: str, port: int, paths: list[str], total: int, connections: int, seed: int) -> dict:
    """A bounded client: ``connections`` keep-alive connections, ``total`` requests. One thread and raw sockets,
    so that the client's own time (no GIL hand-offs between threads, no header parser) stays small next to the
    service's, and its latencies agree with wrk's."""
    rng = random.Random(seed)
    load = _Load(
        host, port, [f"GET {rng.choice(paths)} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for _ in range(total)]
    )
    t_start = time.perf_counter()
    for _ in range(connections):
        load.start(None)
    while load.sel.get_map():
        events = load.sel.select(30)
        if not events:
            raise RuntimeError("no answer from the service in 30 s")
        for key, _ in events:
            load.on_readable(key.data)
    seconds = time.perf_counter() - t_start
    ms = [x * 1e3 for x in load.latencies]
    return {
        "requests": len(ms),
        "seconds": seconds,
        "rps": len(ms) / seconds,
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        **load.counts,
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


def visit(host: str, port: int, paths: list[str], n: int, timeout: float = 5.0) -> int:
    """``n`` new visitors one after the other, each on a fresh connection: how many got a 200 within ``timeout``."""
    answered = 0
    for i in range(n):
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.request("GET", paths[i % len(paths)])
            answered += conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
    return answered


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    add_index_options(p, backbones=False)
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--connections", type=int, default=8, help="concurrent keep-alive connections")
    p.add_argument("--duration", type=float, default=6.0, help="wrk: seconds of load per phase")
    p.add_argument("--rounds", type=int, default=3, help="phase 1: load runs, each with fresh connections")
    p.add_argument("--requests", type=int, default=6000, help="python client: requests per phase")
    p.add_argument("--timeout", type=float, default=10.0, help="wrk: request timeout (s)")
    p.add_argument("--verify", type=int, default=25, help="appids whose answers are checked, for every strategy")
    p.add_argument("--slow-clients", type=int, default=64, help="slow clients of phase 2")
    p.add_argument("--slow-interval", type=float, default=1.0, help="seconds between the slow clients' bytes")
    p.add_argument("--visitors", type=int, default=40, help="new visitors of phase 2")
    p.add_argument("--uploaders", type=int, default=4, help="uploaders of phase 3")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.apps = args.apps or QUICK_APPS
        args.duration, args.requests, args.verify, args.rounds = 1, 100, 2, 1
        args.slow_clients, args.slow_interval, args.visitors, args.uploaders = 4, 0.25, 4, 2
    client = args.client
    if client == "auto":  # --quick: the Python client, the fallback that must work where wrk is missing
        client = "wrk" if shutil.which("wrk") and not args.quick else "python"
    elif client == "wrk" and not shutil.which("wrk"):
        p.error("--client wrk: wrk is not installed (apt-get install wrk), use --client python")
    return args, client


def measure(ws: Workspace, logs: Path, client: str, paths: list[str], sample: list[int], args) -> dict:
    """The three phases (see the module's docstring): each phase's load figures by name."""
    out: dict = {}
    env = ws.server_env(PRELOAD_MODELS="SimpleS16")  # ready means ready: the upload model too
    with running_server(env, logs) as srv:
        print(f"first /health 200 {srv.startup_s:.2f} s after launch", flush=True)
        load(srv, client, paths, args, 1.0, min(1000, args.requests // 5))  # warm-up
        out["alone"] = load(srv, client, paths, args, args.duration, args.requests, args.rounds)
        with SlowClients(srv.host, srv.port, args.slow_clients, args.slow_interval) as slow:
            out["beside slow clients"] = load(srv, client, paths, args, args.duration, args.requests)
            out["visitors"] = visit(srv.host, srv.port, paths, args.visitors)
        out["beside slow clients"]["note"] = f"{args.slow_clients} slow clients ({dict(slow.counts)})"
        with Uploaders(srv.host, srv.port, args.uploaders, ws.upload_jpeg(7)) as up:
            out["beside uploaders"] = load(srv, client, paths, args, args.duration, args.requests)
        out["beside uploaders"]["note"] = f"{args.uploaders} uploaders, answered {dict(sorted(up.counts.items()))}"
        strategies = sorted(p.parent.name for p in ws.index.glob("*/neighbours.npy"))
        out["checked"] = verify_matches(srv.url, ws.index, sample, strategies)
    return out


def main() -> None:
    args, client = parse_args()
    res = Results("serve")
    print(machine_line(), flush=True)
    with service_workspace(args, ["S16"]) as (ws, params, logs):
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
    report(res, out, params, gen, args)
    res.write(args.json)


def report(res: Results, out: dict, params: dict, gen: str, args) -> None:
    conf = gunicorn_settings({"WEB_CONCURRENCY": "2"})
    names = [n for n in out if isinstance(out[n], dict)]
    keys = ("requests", "rps", "p50_ms", "p99_ms", "max_ms", "non200", "errors", "split")
    print()
    print_table(
        ["phase", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "bad status", "errors", "conns/worker"],
        [[n, *(out[n][k] for k in keys)] for n in names],
        title=f"GET /match/<appid>?k=10, random appids of {params['apps']:,}; {conf['worker_class']}, "
        f"{conf['workers']} workers; load: {gen}",
    )
    for n in names:
        if out[n].get("note"):
            print(f"{n}: {out[n]['note']}")
    alone, slow, up = out["alone"], out["beside slow clients"], out["beside uploaders"]
    res.add("GET /match alone: req/s", alone["rps"], "req/s", note=alone["split"])
    res.add("GET /match alone: p99", alone["p99_ms"], "ms")
    visitors = out["visitors"]
    res.add(
        "new visitors answered beside slow clients",
        f"{visitors} of {args.visitors}",
        "",
        "all",
        visitors == args.visitors,
        note=slow["note"],
    )
    res.add("GET /match beside slow clients: p99", slow["p99_ms"], "ms")
    kept = up["rps"] / alone["rps"] if alone["rps"] else 0.0
    res.add("GET /match beside uploaders: req/s / alone", kept, "x", ">= 0.5x", kept >= 0.5, note=up["note"])
    res.add("GET /match beside uploaders: p99", up["p99_ms"], "ms", "<= 10 ms", up["p99_ms"] <= 10)
    bad = sum(out[n]["non200"] + out[n]["errors"] for n in names)
    res.add("GET /match non-200 or errors (all phases)", bad, "", "0", bad == 0)
    res.add("GET /match answers equal the tables", out["checked"], "checked", "all", True)
    print()
    for f in res.figures:
        verdict = f" (target {f.target}: {'PASS' if f.passed else 'MISS'})" if f.target else ""
        print(f"{f.name}: {f.shown()}{verdict}")


if __name__ == "__main__":
    main()
