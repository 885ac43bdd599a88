"""Reading one setting from the environment: whole numbers and switches, with one-line errors.

One parser for the service's settings (app/config.py) and for those gunicorn needs before the app
exists (serving/env.py, gunicorn.conf.py), so that ``1/0, true/false, yes/no, on/off`` mean the same
everywhere and a typo names its variable.
"""

from __future__ import annotations

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_bool(name: str, raw: str | None, default: bool) -> bool:
    """``raw`` as a switch (empty or None: ``default``); ValueError naming ``name`` otherwise."""
    value = (raw or "").strip().lower()
    if not value:
        return default
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError(f"{name}={value!r}: expected 1/0, true/false, yes/no or on/off")


def parse_whole(name: str, raw: str | None, default: int, lo: int) -> int:
    """``raw`` as a whole number of at least ``lo`` (empty or None: ``default``); ValueError otherwise."""
    value = (raw or "").strip() or str(default)
    if not value.isascii() or not value.isdigit() or int(value) < lo:
        raise ValueError(f"{name}={value!r}: expected a whole number of at least {lo}")
    return int(value)
