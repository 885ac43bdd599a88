"""Memory: a limit like a dyno's or a container's (a cgroup v1 memory group), and readings from /proc.

Development only, like ``devtools/server.py`` (whose ``cgroup=`` option runs ``join`` in the server's
child). Needs root and a cgroup v1 memory controller; ``MemoryCgroup.unavailable()`` says why not.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
MB = 2**20


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


def smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/<pid>/smaps_rollup in bytes (Rss, Pss, Pss_Anon, Pss_File, Private_*, Shared_*...)."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * 1024
    return out


def memory_of(pid: int, under: Path | None = None) -> dict[str, float]:
    """RSS, PSS and USS (private) of a process in MiB, plus the same for its mappings of files under
    ``under`` (the index tables), from /proc/<pid>/smaps_rollup and /proc/<pid>/smaps."""
    r = smaps_rollup(pid)
    out = {
        "rss": r.get("Rss", 0) / MB,
        "pss": r.get("Pss", 0) / MB,
        "uss": (r.get("Private_Clean", 0) + r.get("Private_Dirty", 0)) / MB,
        "anon": r.get("Anonymous", 0) / MB,
    }
    if under is not None:
        prefix = str(Path(under).resolve())
        totals = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
        inside = False
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            first = line.split(None, 1)[0]
            if not first.endswith(":"):  # a mapping header: "start-end perms offset dev inode [path]"
                parts = line.split(None, 5)
                inside = len(parts) == 6 and parts[5].startswith(prefix)
            elif inside and first[:-1] in totals:
                totals[first[:-1]] += int(line.split()[1]) * 1024
        out["tables_rss"] = totals["Rss"] / MB
        out["tables_pss"] = totals["Pss"] / MB
        out["tables_uss"] = (totals["Private_Clean"] + totals["Private_Dirty"]) / MB
    return out
