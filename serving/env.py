"""gunicorn's settings from the environment, checked in one place (the app's own: app/config.py).

``serving.launch`` reads them before gunicorn starts (which parses WEB_CONCURRENCY with ``int()`` on import),
and gunicorn.conf.py again: a bad value stops start-up with one line naming the variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from core.env import parse_whole

WHOLE = {  # name -> (default, least value)
    "PORT": (8000, 1),
    "WEB_CONCURRENCY": (2, 1),
    "GUNICORN_TIMEOUT": (120, 1),
    "TORCH_THREADS": (0, 0),  # 0: cores / workers
    "MALLOC_ARENA_MAX": (2, 1),
    "MALLOC_MMAP_THRESHOLD_": (131072, 0),
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def read(env: Mapping[str, str] | None = None) -> dict[str, int | str]:
    """Every setting by name, with its default; ValueError naming the first bad one."""
    env = os.environ if env is None else env
    out: dict[str, int | str] = {name: parse_whole(name, env.get(name), *limits) for name, limits in WHOLE.items()}
    level = (env.get("LOG_LEVEL") or "info").strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"LOG_LEVEL={level!r}: expected one of {', '.join(LOG_LEVELS)}")
    out["LOG_LEVEL"] = level
    return out


def read_or_exit(env: Mapping[str, str] | None = None) -> dict[str, int | str]:
    try:
        return read(env)
    except ValueError as e:
        sys.exit(f"error: cannot start: {e}")
