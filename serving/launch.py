"""The web command of the Procfile and the Dockerfile: ``python -m serving.launch [gunicorn options]``.

It checks gunicorn's settings from the environment (gunicorn.conf.py reads them again), then execs ``gunicorn
-c gunicorn.conf.py wsgi:app`` in the same process, so the platform's signals reach gunicorn.
"""

from __future__ import annotations

import os
import sys

from core.env import FALSE, TRUE, parse_whole

WHOLE = {  # name -> (default, least value)
    "PORT": (8000, 1),
    "WEB_CONCURRENCY": (2, 1),
    "GUNICORN_TIMEOUT": (120, 1),
    "TORCH_THREADS": (0, 0),  # 0: cores / workers
    "MALLOC_ARENA_MAX": (2, 1),
    "MALLOC_MMAP_THRESHOLD_": (131072, 0),
}
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def read_or_exit() -> dict[str, int | str | None]:
    """Every setting by name, with its default; a bad one stops start-up with one line naming it."""
    try:
        out: dict[str, int | str | None] = {
            name: parse_whole(name, os.environ.get(name), *lim) for name, lim in WHOLE.items()
        }
        level = (os.environ.get("LOG_LEVEL") or "info").strip().lower()
        if level not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL={level!r}: expected one of {', '.join(LOG_LEVELS)}")
    except ValueError as e:
        sys.exit(f"error: cannot start: {e}")
    out["LOG_LEVEL"] = level
    out["ACCESS_LOG"] = access_log(os.environ.get("ACCESS_LOG"))
    return out


def access_log(raw: str | None) -> str | None:
    """gunicorn's accesslog: ``-`` (or a switch's on: 1, true, yes, on) for stdout, a path for that file; unset or
    a switch's off (0, false, no, off): none. Not a file named "1" or "off" in the working directory."""
    value = (raw or "").strip()
    if not value or value.lower() in FALSE:
        return None
    return "-" if value.lower() in TRUE else value


def main() -> None:
    read_or_exit()
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *sys.argv[1:], "wsgi:app"])


if __name__ == "__main__":
    main()
