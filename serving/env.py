"""Whole-number settings that gunicorn itself needs (PORT, WEB_CONCURRENCY, ...), read from the environment.

One reader for the launcher (serving/launch.py) and gunicorn.conf.py: a bad value stops start-up with
one line naming the variable, never a traceback. The app's own settings are in app/config.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

# name, default, least value: what serving/launch.py checks before gunicorn starts
GUNICORN_SETTINGS = (
    ("PORT", 8000, 1),
    ("WEB_CONCURRENCY", 2, 1),
    ("GUNICORN_TIMEOUT", 120, 1),
    ("TORCH_THREADS", 0, 0),
)


class EnvError(ValueError):
    """A bad environment variable; the message names it."""


def env_int(name: str, default: int, lo: int = 1, env: Mapping[str, str] | None = None) -> int:
    raw = (os.environ if env is None else env).get(name, "").strip() or str(default)
    if not raw.isascii() or not raw.isdigit() or int(raw) < lo:
        raise EnvError(f"{name}={raw!r}: expected a whole number of at least {lo}")
    return int(raw)


def env_int_or_exit(name: str, default: int, lo: int = 1) -> int:
    """``env_int`` for gunicorn.conf.py, where an exception would be printed with its traceback."""
    try:
        return env_int(name, default, lo)
    except EnvError as e:
        sys.exit(f"error: cannot start: {e}")


def check_gunicorn_settings(env: Mapping[str, str] | None = None) -> None:
    for name, default, lo in GUNICORN_SETTINGS:
        env_int(name, default, lo, env)
