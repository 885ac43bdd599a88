"""Every benchmark, at sizes that fit a few minutes on a 2-core machine, and one combined table.

    python -m bench.run_all [--quick] [--workdir DIR] [--markdown PATH] [--only extract,serve,...]

Runs bench/extract.py, serve.py, upload.py, memory.py and knn.py one after the other (each as its own
process, printing its own table), sharing one workspace (random checkpoints, the synthetic index of
the whole catalog and the banners to upload, made once), then prints one line per measured figure
with its target and PASS / MISS where there is one. ``--markdown`` also writes that table as Markdown (for the README);
``--quick`` runs everything at tiny sizes (the smoke test). Exit status 0 even when a target is
missed (the table says so); 1 when a benchmark fails to run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import DINO_CODES, QUICK_APPS, Figure, Workspace, machine_line, print_table, read_results, verdict

ROOT = Path(__file__).resolve().parent.parent


# (name, arguments at full size, arguments with --quick): sized for ~8 minutes on 2 cores
BENCHES = {
    "extract": (["--seconds", "1"], ["--quick", "--end-to-end"]),
    "serve": (["--duration", "6"], ["--quick"]),
    "upload": (["--requests", "3"], ["--quick"]),
    "memory": (["--get-requests", "1000"], ["--quick"]),
    "knn": (["--queries", "100"], ["--n", "2000", "--dim", "64", "--queries", "20"]),
}


def run(name: str, args: list[str], workdir: Path, out: Path) -> tuple[list[Figure], float, str]:
    """Run one benchmark, echoing its output; its figures (from --json, or parsed for knn.py)."""
    cmd = [sys.executable, "-m", f"bench.{name}", *args]
    if name != "knn":  # knn.py is a plain command: no workspace, no --json; its table is parsed
        cmd += ["--workdir", str(workdir), "--json", str(out)]
    print(f"\n=== {name}: {' '.join(Path(c).name if c.endswith('.py') else c for c in cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    rc = proc.wait()
    elapsed = time.perf_counter() - t0
    text = "".join(lines)
    if rc != 0:
        raise RuntimeError(f"bench/{name}.py exited with {rc}")
    figures = knn_figures(text) if name == "knn" else read_results(out)
    return figures, elapsed, text


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


def markdown(figures: list[Figure]) -> str:
    out = ["| benchmark | figure | value | target | result |", "| --- | --- | --- | --- | --- |"]
    for f in figures:
        out.append(f"| {f.bench} | {f.name} | {f.shown()} | {f.target} | {verdict(f.passed)} |")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--workdir", type=Path, default=None, help="workspace to use and keep (default: temporary)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the combined table as Markdown")
    p.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ", ".join(BENCHES))
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        p.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHES)}")
    start = time.perf_counter()
    print(machine_line(), flush=True)
    load_start = os.getloadavg()[0]
    figures: list[Figure] = []
    timings = []
    failed = []
    with Workspace(args.workdir) as ws, tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ws.ensure_checkpoints(["S16"] if args.quick else DINO_CODES)
        ws.ensure_index(QUICK_APPS if args.quick else None)
        ws.ensure_uploads()  # so that serve, upload and memory need not import torch to make them
        timings.append(("workspace (checkpoints, index, uploads)", time.perf_counter() - t0))
        for name in names:
            full, quick = BENCHES[name]
            try:
                figs, elapsed, _ = run(name, quick if args.quick else full, ws.root, Path(tmp) / f"{name}.json")
            except (RuntimeError, OSError, ValueError) as e:
                print(f"!!! {e}", flush=True)
                failed.append(name)
                continue
            figures.extend(figs)
            timings.append((name, elapsed))
    total = time.perf_counter() - start
    print()
    print_table(
        ["benchmark", "figure", "value", "target", "result"],
        [[f.bench, f.name, f.shown(), f.target, verdict(f.passed)] for f in figures],
        title="All benchmarks" + (" (--quick: tiny sizes, figures meaningless)" if args.quick else ""),
    )
    missed = [f"{f.bench}: {f.name}" for f in figures if f.passed is False]
    spent = ", ".join(f"{n} {s:.0f} s" for n, s in timings)
    print(f"time: {total:.0f} s ({spent}); load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print("targets: " + ("all met" if not missed else f"{len(missed)} missed: " + "; ".join(missed)))
    if failed:
        print(f"FAILED to run: {', '.join(failed)}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(figures))
        print(f"(written to {args.markdown})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
