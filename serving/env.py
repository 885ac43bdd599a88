"""Settings that gunicorn itself needs (PORT, WEB_CONCURRENCY, ...), read from the environment.

One reader for the launcher (serving/launch.py) and gunicorn.conf.py: a bad value stops start-up with
one line naming the variable, never a traceback. The app's own settings are in app/config.py; both
parse values with core/env.py.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import TypeVar

from core.env import parse_bool, parse_whole

# name -> (default, least value): the whole numbers gunicorn.conf.py reads, checked first by serving/launch.py
GUNICORN_SETTINGS = {
    "PORT": (8000, 1),
    "WEB_CONCURRENCY": (2, 1),
    "GUNICORN_TIMEOUT": (120, 1),
    "TORCH_THREADS": (0, 0),  # 0: cores / workers
}

T = TypeVar("T")


class EnvError(ValueError):
    """A bad environment variable; the message names it."""


def env_int(name: str, default: int, lo: int = 1, env: Mapping[str, str] | None = None) -> int:
    try:
        return parse_whole(name, (os.environ if env is None else env).get(name), default, lo)
    except ValueError as e:
        raise EnvError(str(e)) from None


def env_bool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    try:
        return parse_bool(name, (os.environ if env is None else env).get(name), default)
    except ValueError as e:
        raise EnvError(str(e)) from None


def gunicorn_int(name: str, env: Mapping[str, str] | None = None) -> int:
    """One of GUNICORN_SETTINGS, with its default and least value."""
    default, lo = GUNICORN_SETTINGS[name]
    return env_int(name, default, lo, env)


def preload_torch(env: Mapping[str, str] | None = None) -> bool:
    """PRELOAD_TORCH (default on): the master imports torch once the workers serve, then refreshes them."""
    return env_bool("PRELOAD_TORCH", True, env)


def or_exit(read: Callable[..., T], *args) -> T:
    """``read(*args)`` (gunicorn_int, preload_torch) for gunicorn.conf.py, where an exception would be printed
    with its traceback: a bad value stops start-up with one line instead."""
    try:
        return read(*args)
    except EnvError as e:
        sys.exit(f"error: cannot start: {e}")


def check_gunicorn_settings(env: Mapping[str, str] | None = None) -> None:
    for name in GUNICORN_SETTINGS:
        gunicorn_int(name, env)
    preload_torch(env)
