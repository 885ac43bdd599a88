"""Every benchmark, at sizes that fit a few minutes on a 2-core machine, and one combined table.

    python -m bench.run_all [--quick] [--workdir DIR] [--markdown BENCHMARKS.md] [--only extract,...] [--jobs 1]

Runs the benchmarks of BENCHES one after the other (each as its own process, printing its own table),
sharing one workspace (random checkpoints, the synthetic index of the whole catalog and the banners to
upload, made once), then prints one line per measured figure with its target and PASS / MISS where there
is one. ``--markdown`` also writes that table as a Markdown page with the machine it ran on, followed by
the recorded outputs of bench/recorded/ (benchmarks that need a machine this one is not: a GPU);
``make bench`` writes BENCHMARKS.md so. ``--quick`` runs the quick ones at tiny sizes (the smoke test), where
``--jobs 2`` may run two benchmarks at once (their figures then mean even less; each one's output is
printed whole, in order). Exit status 0 even when a target is missed (the table says so); 1 when a
benchmark fails to run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import (
    DINO_CODES,
    QUICK_APPS,
    Figure,
    Workspace,
    machine_line,
    print_table,
    read_results,
    skip_exit_collection,
    verdict,
)

ROOT = Path(__file__).resolve().parent.parent


# (name, arguments at full size, arguments with --quick or None to leave it out): ~7 minutes on 2 cores
BENCHES = {
    "extract": (["--seconds", "1"], ["--quick", "--end-to-end"]),
    "serve": (["--duration", "6"], ["--quick"]),
    "upload": (["--requests", "3"], ["--quick"]),
    "memory": (["--get-requests", "1000"], ["--quick"]),
    "knn": (["--queries", "100"], ["--n", "500", "--dim", "64", "--queries", "10"]),
    "ray_build": ([], None),  # not with --quick: a Ray instance's start (the builds themselves: make test-ray)
    "scale": ([], ["--quick"]),
}


def run(name: str, args: list[str], workdir: Path, out: Path, echo: bool = True) -> tuple[int, str, str, float]:
    """Run one benchmark: its exit status, its header line and output (both echoed as they come when
    ``echo``) and seconds."""
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    if name != "knn":  # knn.py is a plain command: no workspace, no --json; its table is parsed
        cmd += ["--workdir", str(workdir), "--json", str(out)]
    header = f"\n=== {name}: {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd[1:])}\n"
    if echo:
        print(header, end="", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        if echo:
            sys.stdout.write(line)
            sys.stdout.flush()
        lines.append(line)
    rc = proc.wait()
    return rc, header, "".join(lines), time.perf_counter() - t0


def run_benches(
    names: list[str], quick: bool, workdir: Path, tmp: Path, jobs: int
) -> tuple[list[Figure], list[tuple[str, float]], list[str]]:
    """Each benchmark as its own command, ``jobs`` at a time (their outputs then printed whole, in order):
    their figures, (name, seconds) and the names of those that failed to run."""
    figures, timings, failed = [], [], []
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        futures = {
            name: pool.submit(run, name, BENCHES[name][1 if quick else 0], workdir, tmp / f"{name}.json", jobs <= 1)
            for name in names
        }
        for name, future in futures.items():
            try:
                rc, header, text, elapsed = future.result()
                if jobs > 1:
                    print(header + text, end="", flush=True)
                if rc != 0:
                    raise RuntimeError(f"bench/{name}.py exited with {rc}")
                figures.extend(knn_figures(text) if name == "knn" else read_results(tmp / f"{name}.json"))
            except (RuntimeError, OSError, ValueError) as e:
                print(f"!!! {e}", flush=True)
                failed.append(name)
                continue
            timings.append((name, elapsed))
    return figures, timings, failed


def knn_figures(text: str) -> list[Figure]:
    """The lines of knn.py's table ("name   value") as figures."""
    figures = []
    head = text.splitlines()[0] if text else ""
    body = text.split("-" * 20, 1)[-1]
    for line in body.splitlines():
        m = re.match(r"^\s*(\S.*?)\s{2,}(\S.*)$", line.rstrip())
        if not m or line.startswith("-"):
            continue
        figures.append(Figure("knn", m.group(1).strip(), re.sub(r"\s+", " ", m.group(2)), note=head))
    return figures


def markdown(figures: list[Figure], header: str) -> str:
    """BENCHMARKS.md: where and how it ran, the one table, then the recorded outputs (bench/recorded/*.md)."""
    out = ["# Benchmarks", "", header, ""]
    out += ["| benchmark | figure | value | target | result |", "| --- | --- | --- | --- | --- |"]
    for f in figures:
        out.append(f"| {f.bench} | {f.name} | {f.shown()} | {f.target} | {verdict(f.passed)} |")
    recorded = [p.read_text().strip() for p in sorted((ROOT / "bench" / "recorded").glob("*.md"))]
    return "\n".join([*out, "", *(f"{text}\n" for text in recorded)]).rstrip() + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--workdir", type=Path, default=None, help="workspace to use and keep (default: temporary)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the combined table as Markdown")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    p.add_argument("--jobs", type=int, default=1, help="benchmarks run at once (default 1: each alone, as measured)")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    names = [n for n in names if not (args.quick and n in BENCHES and BENCHES[n][1] is None)]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHES)}")
    start = time.perf_counter()
    print(machine_line(), flush=True)
    load_start = os.getloadavg()[0]
    with Workspace(args.workdir) as ws, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ws.ensure_checkpoints(["S16"] if args.quick else DINO_CODES)
        ws.ensure_index(QUICK_APPS if args.quick else None)
        ws.ensure_uploads()  # so that serve, upload and memory need not import torch to make them
        timings = [("workspace (checkpoints, index, uploads)", time.perf_counter() - t0)]
        figures, bench_timings, failed = run_benches(names, args.quick, ws.root, Path(tmp), args.jobs)
        timings += bench_timings
    total = time.perf_counter() - start
    print()
    print_table(
        ["benchmark", "figure", "value", "target", "result"],
        [[f.bench, f.name, f.shown(), f.target, verdict(f.passed)] for f in figures],
        title="All benchmarks" + (" (--quick: tiny sizes, figures meaningless)" if args.quick else ""),
    )
    missed = [f"{f.bench}: {f.name}" for f in figures if f.passed is False]
    spent = ", ".join(f"{n} {s:.0f} s" for n, s in timings)
    at_once = f", {args.jobs} benchmarks at a time" if args.jobs > 1 else ""
    load_end = os.getloadavg()[0]
    print(f"time: {total:.0f} s ({spent}{at_once}); load average {load_start:.1f} at start, {load_end:.1f} at end")
    print("targets: " + ("all met" if not missed else f"{len(missed)} missed: " + "; ".join(missed)))
    if failed:
        print(f"FAILED to run: {', '.join(failed)}")
    if args.markdown:
        header = (
            f"Written by `make bench` (`python -m bench.run_all --markdown {args.markdown.name}`) on "
            f"{time.strftime('%Y-%m-%d')}: {machine_line()}; {total:.0f} s in all, load average {load_start:.1f} at "
            f"start and {load_end:.1f} at end. Machines differ run to run: ratios to a baseline measured in the "
            "same run are the figures to compare."
        )
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(figures, header))
        print(f"(written to {args.markdown})")
    skip_exit_collection()  # torch was imported to make the workspace
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
