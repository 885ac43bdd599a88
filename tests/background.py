"""Commands that tests wait for, started in the background as soon as the tests are collected.

- the benchmark smoke runs of tests/test_bench_smoke.py (``bench.run_all --quick``,
  ``bench.gpu_build --quick``): ~30 s of two cores between them;
- test_dyno.py's workspace (``devtools.workspace.Workspace``): a random ViT-B/16 checkpoint and the
  catalog-size index of all eight strategies, ~12 s of numpy and disk.

The rest of the suite keeps about one core busy. Started at once, at a lower CPU priority, these run
on the idle core while the other tests run; the tests that need them (the smoke tests run last) only
read what they made. The suite's own timing-sensitive tests keep the CPU first.
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
NICE = 19  # the lowest priority: they run on what the tests leave idle


@dataclass
class BackgroundRun:
    """One command in the background: its process, the file its output goes to, its own folder."""

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


_runs: dict[str, BackgroundRun] = {}
_folder: Path | None = None


def _start(name: str) -> BackgroundRun:
    """Start ``COMMANDS[name]`` once: ``python <args>`` (``{work}``: its own folder), output in ``output.log``."""
    if name in _runs:
        return _runs[name]
    global _folder
    _folder = _folder or Path(tempfile.mkdtemp(prefix="background-runs-"))
    _, args, env = COMMANDS[name]
    work = _folder / name
    work.mkdir()
    log = work / "output.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, *(a.format(work=work) for a in args)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            preexec_fn=lambda: os.nice(NICE),
        )
    _runs[name] = BackgroundRun(proc, log, work)
    return _runs[name]


_DYNO_WORKSPACE = (
    "import sys; from devtools.workspace import Workspace; ws = Workspace(sys.argv[1]); "
    "ws.ensure_checkpoints(['B16']); ws.ensure_index()"
)
COMMANDS = {  # name: (the test file that waits for it, python's arguments, extra environment)
    "gpu_build": ("test_bench_smoke.py", ["-m", "bench.gpu_build", "--quick", "--workdir", "{work}/ws"], {}),
    "run_all": (
        "test_bench_smoke.py",
        ["-m", "bench.run_all", "--quick", "--jobs", "2", "--workdir", "{work}/ws", "--markdown", "{work}/results.md"],
        {},
    ),
    "dyno_workspace": ("test_dyno.py", ["-c", _DYNO_WORKSPACE, "{work}/ws"], {}),
}


def start_for(test_files: set[str]) -> None:
    """Start (once) the commands that these test files wait for."""
    for name, (test_file, _, _) in COMMANDS.items():
        if test_file in test_files:
            _start(name)


def get(name: str) -> BackgroundRun:
    """A started command, by name; started now if the collection hook did not."""
    return _start(name)


def stop_all() -> None:
    """Kill what still runs and remove the work folders (at the end of the session)."""
    for run in _runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    if _folder is not None:
        shutil.rmtree(_folder, ignore_errors=True)
