"""How the offline commands end: one line on stderr (``error: ...``) and a shared exit code: BAD_INPUT (2) when
the arguments or inputs are wrong and nothing changed, FAILED (1) when the work failed, INTERRUPTED (130)."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable

FAILED = 1
BAD_INPUT = 2
INTERRUPTED = 130


def error(message: object, code: int = BAD_INPUT) -> int:
    """Print ``error: message`` on stderr; returns ``code``, for ``return error(...)`` in a ``main``."""
    print(f"error: {message}", file=sys.stderr)
    return code


def interrupted(kept: str) -> int:
    """Print what an interrupt left behind (``kept``) on stderr; returns INTERRUPTED."""
    print(f"interrupted: {kept}", file=sys.stderr)
    return INTERRUPTED


def device_problem(device: str | None) -> str | None:
    """Why a ``--device`` cannot be used (cpu, cuda or cuda:N), or None; checked before torch is imported."""
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        return f"--device {device}: expected cpu or cuda (or cuda:N)"
    return None


def number(kind: type[int] | type[float], lo: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a ``kind`` number of at least ``lo`` (above it with ``above``)."""

    def parse(text: str) -> float:
        value = kind(text)
        if not (value > lo if above else value >= lo):  # NaN fails both
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {lo:g}, got {text}")
        return value

    return parse
