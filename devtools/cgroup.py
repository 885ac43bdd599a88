"""A memory limit like a dyno's or a container's: a cgroup v1 memory group, for tests and benchmarks.

Development only, like ``devtools/server.py`` (whose ``cgroup=`` option runs ``join`` in the server's
child). Needs root and a cgroup v1 memory controller; ``MemoryCgroup.unavailable()`` says why not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")


class MemoryCgroup:
    """A cgroup v1 memory group with a hard limit and no swap (what a 1 GB dyno or container gives).

    Processes moved in with ``add(pid)`` before they fork, or started with ``preexec_fn=cgroup.join``,
    stay in with their children; the kernel's OOM killer acts when they together exceed the limit, and
    ``oom_kills()`` counts its kills.
    """

    def __init__(self, limit_bytes: int, name: str | None = None) -> None:
        why = self.unavailable()
        if why:
            raise RuntimeError(why)
        self.path = CGROUP_MEMORY / (name or f"steam-dino-{os.getpid()}-{time.monotonic_ns()}")
        self.path.mkdir()
        self.limit_bytes = limit_bytes
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # no swap either (absent when the kernel does not account swap)
            memsw.write_text(str(limit_bytes))

    @staticmethod
    def unavailable() -> str | None:
        """Why a memory group cannot be made here (None: it can)."""
        if not (CGROUP_MEMORY / "memory.limit_in_bytes").is_file():
            return f"no cgroup v1 memory controller mounted at {CGROUP_MEMORY}"
        if not os.access(CGROUP_MEMORY, os.W_OK):
            return f"{CGROUP_MEMORY} is not writable (needs root)"
        return None

    def add(self, pid: int) -> None:
        """Move a process into the group."""
        (self.path / "cgroup.procs").write_text(str(pid))

    def join(self) -> None:
        """Move the calling process into the group (use as Popen's preexec_fn)."""
        self.add(os.getpid())

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def peak(self) -> int:
        """The group's peak usage in bytes (since it was made or since ``reset_peak``)."""
        return int(self._read("memory.max_usage_in_bytes"))

    def reset_peak(self) -> None:
        (self.path / "memory.max_usage_in_bytes").write_text("0")

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in the group (older kernels: 1 if it ever hit the limit under OOM)."""
        fields = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        if "oom_kill" in fields:
            return int(fields["oom_kill"])
        return int(fields.get("under_oom", 0))

    def remove(self) -> None:
        """Remove the group (its processes must have exited; the kernel frees it shortly after)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
