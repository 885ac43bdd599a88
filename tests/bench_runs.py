"""The benchmark smoke runs of tests/test_bench_smoke.py, started in the background as soon as the tests
are collected.

They are commands (``bench.run_all --quick``, ``bench.gpu_build --quick``) that take ~30 s of two cores
between them, while the rest of the suite keeps about one core busy. Started at once, at a lower CPU
priority, they run on the idle core while the other tests run, and test_bench_smoke.py (moved last)
only reads what they printed. The suite's own timing-sensitive tests keep the CPU first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NICE = 10  # below the tests, above nothing else


@dataclass
class BenchRun:
    """One command in the background: its process, the file its output goes to, its work folder."""

    proc: subprocess.Popen
    log: Path
    work: Path

    def wait(self, timeout: float) -> tuple[int, str]:
        """Its exit status and whole output, once it has ended (killed after ``timeout`` seconds)."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return rc, self.log.read_text()


_runs: dict[str, BenchRun] = {}
_folder: Path | None = None


def _start(name: str, args: list[str], env: dict[str, str] | None = None) -> None:
    """``python -m <args> --workdir <its folder>/ws``; ``{work}`` in ``args`` stands for its folder."""
    global _folder
    _folder = _folder or Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    work = _folder / name
    work.mkdir()
    log = work / "output.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *(a.format(work=work) for a in args), "--workdir", str(work / "ws")],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=lambda: os.nice(NICE),
        )
    _runs[name] = BenchRun(proc, log, work)


def start_all() -> None:
    """Start both runs (once)."""
    if _runs:
        return
    _start("gpu_build", ["bench.gpu_build", "--quick"])
    # the services start without the master's torch import and refresh (tested in test_dyno.py and
    # test_server.py): seconds of each benchmark's start-up that say nothing about whether it runs
    args = ["bench.run_all", "--quick", "--jobs", "2", "--markdown", "{work}/results.md"]
    _start("run_all", args, {"PRELOAD_TORCH": "0"})


def get(name: str) -> BenchRun:
    """A started run, by name ("gpu_build" or "run_all"); started now if the collection hook did not."""
    start_all()
    return _runs[name]


def stop_all() -> None:
    """Kill what still runs and remove the work folders (at the end of the session)."""
    for run in _runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)
