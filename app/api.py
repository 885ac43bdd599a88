"""The JSON API: similar games by appid (tables) or by uploaded image (embedded on demand).

Every parameter is validated and every client error is a 4xx JSON body with a
stable code (see errors.py); responses are built from the memory-mapped
tables without copying them.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request

from core.steam import is_ascii_digits

from .errors import APIError, bad_param
from .service import EXTENSION_KEY, Service, get_service, starting_error

bp = Blueprint("api", __name__)


_host_urls: dict[tuple[str, str], str] = {}


def host_url() -> str:
    """``request.host_url`` ("http://host/"), memoised: werkzeug's IRI handling costs more than a lookup."""
    key = (request.scheme, request.host)
    url = _host_urls.get(key)
    if url is None:
        url = request.host_url
        if len(_host_urls) < 1024:  # Host headers come from clients: bound the memo
            _host_urls[key] = url
    return url


# -- parameters ------------------------------------------------------------------------------------
def int_param(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    raw = raw.strip()
    if not is_ascii_digits(raw.removeprefix("-")) or len(raw) > 12:
        raise bad_param(name, f"expected an integer from {lo} to {hi}, got {raw[:40]!r}")
    value = int(raw)
    if not lo <= value <= hi:
        raise bad_param(name, f"must be from {lo} to {hi}, got {value}")
    return value


def parse_appid(raw: str) -> int:
    if not is_ascii_digits(raw) or len(raw) > 10:
        raise APIError(400, "bad_appid", f"appid must be a non-negative integer, got {raw[:40]!r}", parameter="appid")
    return int(raw)


def strategy_param(svc: Service, name: str = "strategy") -> str:
    raw = request.args.get(name)
    if raw is None or not raw.strip():
        return svc.default_strategy
    resolved = svc.resolve_strategy(raw.strip())
    if resolved is None:
        raise svc.unknown_strategy(raw.strip(), name)
    return resolved


def k_param(svc: Service, strategy: str, default: int = 10) -> int:
    hi = svc.max_k(strategy)
    return int_param("k", min(default, hi), 1, hi) if hi >= 1 else 0


# -- endpoints -------------------------------------------------------------------------------------
@bp.get("/match/<appid>")
def match_appid(appid: str):
    svc = get_service()
    app_id = parse_appid(appid)
    strategy = strategy_param(svc)
    k = k_param(svc, strategy)
    game = svc.catalog.get(app_id)
    if game is None:
        payload = svc.fallback_match(app_id, strategy, k, host_url())
        if payload is None:
            raise APIError(404, "unknown_appid", f"appid {app_id} is not in the index", appid=app_id)
        return jsonify(payload)
    body = svc.table_payload_json(strategy, game, k, host_url())
    return current_app.response_class(
        body, mimetype="application/json", headers={"Cache-Control": "public, max-age=3600"}
    )


@bp.post("/match")
def match_upload():
    svc = get_service()
    strategy = strategy_param(svc)
    k = k_param(svc, strategy)
    svc.check_rate_limit(request.remote_addr or "-")
    payload, timings, _ = svc.upload_payload(strategy, k, host_url())
    resp = jsonify(payload)
    resp.headers["Server-Timing"] = ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items())
    return resp


@bp.get("/strategies")
def strategies():
    svc = get_service()
    return jsonify(
        {"default": svc.default_strategy, "strategies": [svc.describe_strategy(n) for n in svc.strategy_names]}
    )


@bp.get("/apps/<appid>")
def app_info(appid: str):
    svc = get_service()
    app_id = parse_appid(appid)
    game = svc.catalog.get(app_id)
    if game is None:
        raise APIError(404, "unknown_appid", f"appid {app_id} is not in the index", appid=app_id)
    return jsonify(svc.catalog.describe_row(game.row, host_url()) | {"strategies": svc.strategy_names})


@bp.get("/apps")
def app_search():
    svc = get_service()
    q = request.args.get("q")
    if q is None or not q.strip():
        raise bad_param("q", "give a name (or part of one) to search for, e.g. /apps?q=portal")
    if len(q) > 200:
        raise bad_param("q", "at most 200 characters")
    limit = int_param("limit", 20, 1, 100)
    games = svc.catalog.search(q, limit)
    return jsonify({"query": q, "results": [svc.catalog.describe_row(g.row, host_url()) for g in games]})


@bp.get("/unique")
def unique():
    svc = get_service()
    strategy = strategy_param(svc)
    n = int_param("n", 20, 1, max(1, len(svc.catalog)))
    return jsonify({"strategy": strategy, "n": n, "games": svc.unique_payload(strategy, n, host_url())})


@bp.get("/compare/<appid>")
def compare(appid: str):
    svc = get_service()
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    if best == "text/html":
        from .pages import compare_page

        return compare_page(appid)
    app_id = parse_appid(appid)
    names = svc.strategies_param(request.args.get("strategies"))
    k = int_param("k", 10, 1, max(1, min(svc.max_k(n) for n in names)))
    game = svc.catalog.get(app_id)
    if game is None:
        raise APIError(404, "unknown_appid", f"appid {app_id} is not in the index", appid=app_id)
    return jsonify(svc.compare_payload(names, game, k, host_url()))


@bp.get("/health")
def health():
    started = current_app.config["STARTED_AT"]
    svc = current_app.extensions.get(EXTENSION_KEY)
    if svc is None:  # a fetched index not ready yet (app/boot.py)
        detail = starting_error().message
        body = {"status": "starting", "detail": detail, "uptime_s": round(time.time() - started, 1)}
        return jsonify(body), 503, {"Retry-After": "5"}
    return jsonify(
        {
            "status": "ok",
            "apps": len(svc.catalog),
            "strategies": svc.strategy_names,
            "default_strategy": svc.default_strategy,
            "index_created": svc.index.manifest.get("created"),
            "models_loaded": svc.matcher.loaded_backbones(),
            "uptime_s": round(time.time() - started, 1),
        }
    )
