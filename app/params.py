"""What the views read from a request: the service, validated parameters and the base URL, in one place.

Both blueprints (``api``, ``pages``) parse through these, so a parameter means
the same and fails the same way (a 400 with a stable code) everywhere.
"""

from __future__ import annotations

from flask import current_app, request

from core.steam import is_ascii_digits

from .problems import BadRequest, bad_parameter, unknown_strategy
from .service import Service

EXTENSION_KEY = "steam_dino"  # the Service in app.extensions


def get_service() -> Service:
    return current_app.extensions[EXTENSION_KEY]


def host_url() -> str:
    """The base of the absolute URLs in responses: PUBLIC_URL when configured, else "/" (relative URLs).

    Never the request's Host header: responses are cacheable (``Cache-Control: public``), and a
    forged Host would otherwise be echoed into banner URLs served to everyone from a shared cache.
    """
    return get_service().settings.public_url or "/"


def int_param(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    raw = raw.strip()
    if not is_ascii_digits(raw.removeprefix("-")) or len(raw) > 12:
        raise bad_parameter(name, f"expected an integer from {lo} to {hi}, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise bad_parameter(name, f"must be from {lo} to {hi}, got {value}")
    return value


def parse_appid(raw: str) -> int:
    if not is_ascii_digits(raw) or len(raw) > 10:
        raise BadRequest("bad_appid", f"appid must be a non-negative integer, got {raw[:40]!r}", parameter="appid")
    return int(raw)


def strategy_value(svc: Service, raw: str | None, name: str = "strategy") -> str:
    """The index's strategy for a parameter's value (case-insensitive); the default when absent."""
    if raw is None or not raw.strip():
        return svc.default_strategy
    resolved = svc.resolve_strategy(raw.strip())
    if resolved is None:
        raise unknown_strategy(raw.strip(), name, svc.strategy_names)
    return resolved


def strategy_param(svc: Service, name: str = "strategy") -> str:
    return strategy_value(svc, request.args.get(name), name)


def strategies_param(svc: Service, name: str = "strategies") -> list[str]:
    """A comma-separated list of strategies, each once; all of the index's when absent."""
    raw = request.args.get(name)
    if raw is None or not raw.strip():
        return list(svc.strategy_names)
    names = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        resolved = strategy_value(svc, part, name)
        if resolved not in names:
            names.append(resolved)
    if not names:
        raise bad_parameter(name, "give at least one name")
    return names


def k_param(svc: Service, strategy: str, default: int = 10) -> int:
    hi = svc.max_k(strategy)
    return int_param("k", min(default, hi), 1, hi) if hi >= 1 else 0
