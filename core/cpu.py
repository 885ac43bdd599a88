"""How many cores this process may use (torch-free: the gunicorn master and its hooks use it)."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
