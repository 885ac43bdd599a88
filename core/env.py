"""Parsing one setting's value (switch, whole number, number, URL) with one-line errors naming the setting: one copy, so
that ``1/0, true/false, yes/no, on/off`` mean the same in the service's, gunicorn's and the API's switches."""

from __future__ import annotations

import math
import urllib.parse

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_bool(name: str, raw: str | None, default: bool) -> bool:
    """``raw`` as a switch (empty or None: ``default``); ValueError naming ``name`` otherwise."""
    value = (raw or "").strip().lower()
    if not value:
        return default
    if value in TRUE or value in FALSE:
        return value in TRUE
    raise ValueError(f"{name}={value[:40]!r}: expected 1/0, true/false, yes/no or on/off")  # echoed, bounded


def parse_whole(name: str, raw: str | None, default: int, lo: int, hi: int | None = None) -> int:
    """``raw`` as a whole number from ``lo`` (to ``hi``) (empty or None: ``default``); ValueError otherwise."""
    value = (raw or "").strip() or str(default)
    ok = value.isascii() and value.isdigit() and len(value) < 19
    if not ok or int(value) < lo or (hi is not None and int(value) > hi):
        within = f"of at least {lo}" if hi is None else f"from {lo} to {hi}"
        raise ValueError(f"{name}={value!r}: expected a whole number {within}")
    return int(value)


def parse_float(name: str, raw: str | None, default: float, lo: float, hi: float) -> float:
    """``raw`` as a number from ``lo`` to ``hi`` (empty or None: ``default``); ValueError otherwise."""
    value = (raw or "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not lo <= number <= hi:
        raise ValueError(f"{name}={value!r}: expected a number from {lo:g} to {hi:g}")
    return number


def is_http_url(text: str) -> bool:
    """Whether ``text`` is an absolute http(s) URL with a host (``https://:443/`` has none; a malformed one is not)."""
    try:
        url = urllib.parse.urlparse(text)
    except ValueError:  # an unclosed IPv6 bracket
        return False
    return url.scheme in ("http", "https") and bool(url.hostname)
