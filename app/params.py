"""What the views read from a request: the service, validated parameters and the base URL.

``PARAMS`` declares every parameter once: its JSON schema, whose limits the readers below enforce, and what it
means; app/openapi.py publishes the same entries. Both blueprints parse through these readers, so a parameter
fails the same way (a 400 with a stable code) everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import current_app, request

from core.env import parse_bool
from core.steam import is_ascii_digits
from core.variants import TRANSFORMS, variant_name

from .problems import BadRequest, Unavailable, bad_parameter
from .service import Service

EXTENSION_KEY = "steam_dino"  # the Service in app.extensions
APPID_DIGITS = 10
FLAG = {"type": "integer", "enum": [0, 1]}  # published as 0/1; the readers also take true/false, yes/no, on/off

# name: (JSON schema, description); path parameters are appid, other and filename
PARAMS: dict[str, tuple[dict, str]] = {
    "appid": ({"type": "integer", "minimum": 0, "maximum": 10**APPID_DIGITS - 1}, "a Steam appid"),
    "other": ({"type": "integer", "minimum": 0, "maximum": 10**APPID_DIGITS - 1}, "the other game's appid"),
    "strategy": ({"type": "string"}, "strategy name, case-insensitive (GET /strategies); default ComplexB16"),
    "strategies": ({"type": "string"}, "comma-separated strategies (default: all)"),
    "k": ({"type": "integer", "minimum": 1}, "matches per answer, 1 to the table width (default 10)"),
    "offset": (
        {"type": "integer", "minimum": 0},
        "skip this many matches: pages through the table (offset + k may reach the table width)",
    ),
    "mirror": (
        FLAG,
        "1: query with the banner mirrored left to right (lookups need an index built with "
        "--variants mirror,flip; uploads are transformed before embedding)",
    ),
    "flip": (FLAG, "1: query with the banner flipped upside down (as mirror)"),
    "embedding": (FLAG, "1: return the upload's L2-normalised embedding"),
    "attention": (FLAG, "1: return the upload's attention map (what the model looks at)"),
    "appids": ({"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$"}, "comma-separated appids, e.g. 620,400"),
    "q": ({"type": "string", "minLength": 1, "maxLength": 200}, "name or part of it"),
    "limit": ({"type": "integer", "minimum": 1, "maximum": 100, "default": 20}, "games at most (default 20)"),
    "n": ({"type": "integer", "minimum": 1, "default": 20}, "games per answer (default 20)"),
    "filename": ({"type": "string"}, "e.g. style.css"),
}


def get_service() -> Service:
    """The app's service; a 503 ``starting`` while a fetched index is not ready yet (app/boot.py)."""
    service = current_app.extensions.get(EXTENSION_KEY)
    if service is None:
        raise starting()
    return service


def starting() -> Unavailable:
    from .boot import BOOT_KEY

    boot = current_app.extensions.get(BOOT_KEY)
    detail = boot.detail if boot is not None else "starting"
    return Unavailable("starting", f"the service is starting: {detail}; try again shortly", retry_after=5)


def host_url() -> str:
    """The base of the absolute URLs in responses: PUBLIC_URL when configured, else "/" (relative URLs).

    Never the request's Host header: responses are cacheable (``Cache-Control: public``), and a
    forged Host would otherwise be echoed into banner URLs served to everyone from a shared cache.
    """
    return get_service().settings.public_url or "/"


def int_param(name: str, default: int | None = None, hi: int | None = None) -> int:
    """An integer query parameter within PARAMS' limits (``hi`` narrows the maximum to this index), ``default``
    when absent or empty, or a 400 naming the allowed range."""
    schema, raw = PARAMS[name][0], request.args.get(name)
    if raw is None or raw == "":
        return schema["default"] if default is None else default
    lo, hi = schema["minimum"], schema["maximum"] if hi is None else hi
    raw = raw.strip()
    if not is_ascii_digits(raw.removeprefix("-")) or len(raw) > 12:
        raise bad_parameter(name, f"expected an integer from {lo} to {hi}, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise bad_parameter(name, f"must be from {lo} to {hi}, got {value}")
    return value


def parse_appid(raw: str) -> int:
    if not is_ascii_digits(raw) or len(raw) > APPID_DIGITS:
        raise BadRequest("bad_appid", f"appid must be a non-negative integer, got {raw[:40]!r}", parameter="appid")
    return int(raw)


def text_param(name: str) -> str:
    """A required text parameter, not blank and within PARAMS' length."""
    raw, most = request.args.get(name), PARAMS[name][0]["maxLength"]
    if raw is None or not raw.strip():
        raise bad_parameter(name, "give a name (or part of one) to search for, e.g. /apps?q=portal")
    if len(raw) > most:
        raise bad_parameter(name, f"at most {most} characters")
    return raw


def strategy_value(svc: Service, raw: str | None, name: str = "strategy") -> str:
    """The index's strategy for a parameter's value (case-insensitive); the default when absent."""
    if raw is None or not raw.strip():
        return svc.default_strategy
    resolved = svc.resolve_strategy(raw.strip())
    if resolved is None:
        available = svc.strategy_names
        message = f"unknown strategy {raw.strip()[:60]!r}; available: {', '.join(available)}"
        raise BadRequest("unknown_strategy", message, parameter=name, available=available)
    return resolved


def strategy_param(svc: Service) -> str:
    return strategy_value(svc, request.args.get("strategy"))


def strategies_param(svc: Service) -> list[str]:
    """A comma-separated list of strategies, each once; all of the index's when absent."""
    raw = request.args.get("strategies")
    if raw is None or not raw.strip():
        return list(svc.strategy_names)
    names = list(dict.fromkeys(strategy_value(svc, p, "strategies") for p in raw.split(",") if p.strip()))
    if not names:
        raise bad_parameter("strategies", "give at least one name")
    return names


def k_param(svc: Service, strategy: str, default: int = 10) -> int:
    """How many matches to answer: 1 to the table's width (0 for a table without neighbours)."""
    hi = svc.max_k(strategy)
    return int_param("k", min(default, hi), hi) if hi >= 1 else 0


def offset_param(svc: Service, strategy: str) -> int:
    """Where a page of matches starts (0: the best match); pages end at the table's width."""
    return int_param("offset", 0, max(0, svc.max_k(strategy) - 1))


def flag_param(name: str, args: Mapping[str, str] | None = None) -> bool:
    """A yes/no switch of the request's (or ``args``') query (core.env.parse_bool's words; absent: no), or a 400."""
    try:
        return parse_bool(name, (request.args if args is None else args).get(name), False)
    except ValueError as e:
        raise BadRequest("bad_parameter", str(e), parameter=name) from None


def variant_param(args: Mapping[str, str] | None = None) -> str:
    """The mirror/flip variant the query asks for ("" for the banner as it is)."""
    return variant_name([t for t in TRANSFORMS if flag_param(t, args)])


def appids_param(name: str, cap: int) -> list[int]:
    """A comma-separated list of appids, at most ``cap`` of them, in the order given."""
    parts = [p.strip() for p in (request.args.get(name) or "").split(",") if p.strip()]
    if not parts:
        raise bad_parameter(name, "give one or more appids separated by commas, e.g. appids=620,400")
    if len(parts) > cap:
        raise bad_parameter(name, f"at most {cap} appids per request, got {len(parts)}")
    return [parse_appid(p) for p in parts]
