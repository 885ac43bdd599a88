"""The JSON API: similar games by appid (tables) or by uploaded image (embedded on demand).

Parameters are parsed by ``app/params.py`` and failures raised as domain
problems, which ``app/errors.py`` turns into 4xx JSON bodies with stable
codes; responses are built from the memory-mapped tables without copying them.
"""

from __future__ import annotations

import time

from flask import Blueprint, current_app, g, jsonify, render_template, request

from .params import get_service, host_url, int_param, k_param, parse_appid, strategies_param, strategy_param
from .problems import bad_parameter
from .uploads import read_upload

bp = Blueprint("api", __name__)


@bp.get("/match/<appid>")
def match_appid(appid: str):
    svc = get_service()
    app_id = parse_appid(appid)
    strategy = strategy_param(svc)
    k = k_param(svc, strategy)
    game = svc.catalog.get(app_id)
    if game is None:
        return jsonify(svc.fallback_match(app_id, strategy, k, host_url(), request.remote_addr or "-"))
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
    data = read_upload(svc.settings)
    payload, timings, _ = svc.upload_payload(data, strategy, k, host_url())
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
    game = svc.game(parse_appid(appid))
    return jsonify(svc.catalog.describe_row(game.row, host_url()) | {"strategies": svc.strategy_names})


@bp.get("/apps")
def app_search():
    svc = get_service()
    q = request.args.get("q")
    if q is None or not q.strip():
        raise bad_parameter("q", "give a name (or part of one) to search for, e.g. /apps?q=portal")
    if len(q) > 200:
        raise bad_parameter("q", "at most 200 characters")
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
    """JSON for API clients; the same URL is a page for browsers (content negotiation on Accept)."""
    svc = get_service()
    html = request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"
    g.html = html  # errors on this request render as HTML for browsers
    app_id = parse_appid(appid)
    names = strategies_param(svc)
    k = int_param("k", 8 if html else 10, 1, max(1, min(svc.max_k(n) for n in names)))
    payload = svc.compare_payload(names, svc.game(app_id), k, host_url())
    if not html:
        return jsonify(payload)
    descriptions = {n: svc.describe_strategy(n) for n in names}
    return render_template("compare.html", payload=payload, descriptions=descriptions)


@bp.get("/health")
def health():
    svc = get_service()
    started = current_app.config["STARTED_AT"]
    ready, workers = _workers_ready()
    body = jsonify(
        {
            "status": "ok" if ready >= workers else "starting",
            "workers_ready": ready,
            "workers": workers,
            "apps": len(svc.catalog),
            "strategies": svc.strategy_names,
            "default_strategy": svc.default_strategy,
            "index_created": svc.index.manifest.get("created"),
            "models_loaded": svc.matcher.loaded_backbones(),
            "uptime_s": round(time.time() - started, 1),
        }
    )
    body.status_code = 200 if ready >= workers else 503  # ready means every worker serves
    return body


def _workers_ready() -> tuple[int, int]:
    """(serving workers, configured workers) from gunicorn's worker (serving.worker); (1, 1) elsewhere."""
    probe = request.environ.get("serving.ready")
    return probe() if probe is not None else (1, 1)
