"""The JSON API: similar games by appid (tables) or by uploaded image (embedded on demand).

Parameters are parsed by ``app/params.py``; failures are domain problems that ``app/errors.py`` turns into JSON
errors. Answers read from the index carry an ``ETag`` and ``Cache-Control``; a matching ``If-None-Match`` gets a 304.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Blueprint, Response, current_app, g, jsonify, make_response, render_template, request

from . import metrics
from .params import (
    EXTENSION_KEY,
    appids_param,
    flag_param,
    get_service,
    host_url,
    int_param,
    k_param,
    offset_param,
    parse_appid,
    starting,
    strategies_param,
    strategy_param,
    text_param,
    variant_param,
)
from .uploads import read_upload, read_url_query

bp = Blueprint("api", __name__)


def _cached(etag: str, build: Callable[[], Response]) -> Response:
    """304 when the client holds this ETag; else the response ``build()`` makes, with its ETag and Cache-Control."""
    cache = get_service().http_cache
    cached = cache.not_modified(etag)
    return cached if cached is not None else cache.mark(build(), etag)


def _cached_json(etag: str, build: Callable[[], dict]) -> Response:
    return _cached(etag, lambda: jsonify(build()))


def _cached_png(etag: str, build: Callable[[], bytes]) -> Response:
    return _cached(etag, lambda: current_app.response_class(build(), mimetype="image/png"))


def _lookup_params(svc) -> tuple[str, int, int, str]:
    """A table lookup's strategy, k, offset and mirror/flip variant (a 400 for a variant the index lacks)."""
    strategy = strategy_param(svc)
    k, offset, variant = k_param(svc, strategy), offset_param(svc, strategy), variant_param()
    svc.check_variant(strategy, variant)
    return strategy, k, offset, variant


@bp.get("/match/<appid>")
def match_appid(appid: str):
    svc = get_service()
    app_id = parse_appid(appid)
    strategy, k, offset, variant = _lookup_params(svc)
    host = host_url()
    game = svc.catalog.get(app_id)
    if game is None:
        return jsonify(svc.fallback_match(app_id, strategy, k, host, offset, variant))
    etag = svc.http_cache.etag("m", app_id, strategy, k, offset, variant, host)
    return _cached_json(etag, lambda: svc.table_payload(strategy, game, k, host, offset, variant))


@bp.get("/match")
def match_batch():
    """Many lookups in one request: ``/match?appids=620,400`` (at most MAX_BATCH appids)."""
    svc = get_service()
    appids = appids_param("appids", svc.settings.max_batch)
    strategy, k, offset, variant = _lookup_params(svc)
    host = host_url()
    etag = svc.http_cache.etag("b", ",".join(map(str, appids)), strategy, k, offset, variant, host)
    return _cached_json(etag, lambda: svc.batch_payload(strategy, appids, k, host, offset, variant))


@bp.post("/match")
def match_upload():
    """An image to embed: uploaded (multipart or raw ``image/*``), or fetched from a URL (JSON ``{"url": ...}``)."""
    svc = get_service()
    strategy = strategy_param(svc)
    k, offset, variant = k_param(svc, strategy), offset_param(svc, strategy), variant_param()
    embedding, attention = flag_param("embedding"), flag_param("attention")
    data = svc.fetch_url(read_url_query()) if request.mimetype == "application/json" else read_upload()
    payload, timings, _ = svc.upload_payload(
        data, strategy, k, host_url(), offset=offset, variant=variant, embedding=embedding, attention=attention
    )
    resp = jsonify(payload)
    resp.headers["Server-Timing"] = ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items())
    return resp


@bp.get("/attention/<appid>")
def attention(appid: str):
    """What the model looks at in a game's banner: the [CLS] attention map stored in the index."""
    svc = get_service()
    game, strategy = svc.game(parse_appid(appid)), strategy_param(svc)
    etag = svc.http_cache.etag("attention", game.appid, strategy)
    return _cached_json(etag, lambda: svc.attention_payload(strategy, game))


@bp.get("/attention/<appid>.png")
def attention_png(appid: str):
    svc = get_service()
    game, strategy = svc.game(parse_appid(appid)), strategy_param(svc)
    etag = svc.http_cache.etag("attention.png", game.appid, strategy)
    return _cached_png(etag, lambda: svc.overlay_png(strategy, [(game, svc.attention_map(strategy, game))]))


@bp.get("/why/<appid>/<other>")
def why(appid: str, other: str):
    """Which parts of two banners match: each patch's best cosine to the other banner's patches (a model pass)."""
    svc = get_service()
    a, b, strategy, host = svc.game(parse_appid(appid)), svc.game(parse_appid(other)), strategy_param(svc), host_url()
    etag = svc.http_cache.etag("why", a.appid, b.appid, strategy, host)
    return _cached_json(etag, lambda: svc.why_payload(strategy, a, b, host))


@bp.get("/why/<appid>/<other>.png")
def why_png(appid: str, other: str):
    svc = get_service()
    a, b, strategy = svc.game(parse_appid(appid)), svc.game(parse_appid(other)), strategy_param(svc)
    etag = svc.http_cache.etag("why.png", a.appid, b.appid, strategy)
    return _cached_png(etag, lambda: svc.why_png(strategy, a, b))


@bp.get("/strategies")
def strategies():
    svc = get_service()
    etag = svc.http_cache.etag("strategies")
    return _cached_json(
        etag,
        lambda: {"default": svc.default_strategy, "strategies": [svc.describe_strategy(n) for n in svc.strategy_names]},
    )


@bp.get("/apps/<appid>")
def app_info(appid: str):
    svc = get_service()
    game = svc.game(parse_appid(appid))
    host = host_url()
    etag = svc.http_cache.etag("app", game.appid, host)
    return _cached_json(etag, lambda: svc.catalog.describe_row(game.row, host) | {"strategies": svc.strategy_names})


@bp.get("/apps")
def app_search():
    svc = get_service()
    q, limit, host = text_param("q"), int_param("limit"), host_url()
    etag = svc.http_cache.etag("search", q, limit, host)
    return _cached_json(etag, lambda: {"query": q, "results": svc.search_payload(q, limit, host)})


@bp.get("/unique")
def unique():
    svc = get_service()
    strategy = strategy_param(svc)
    total = max(1, len(svc.catalog))
    n, offset, host = int_param("n", hi=total), int_param("offset", 0, total - 1), host_url()
    etag = svc.http_cache.etag("unique", strategy, n, offset, host)
    return _cached_json(etag, lambda: svc.unique_payload(strategy, n, host, offset))


@bp.get("/compare/<appid>")
def compare(appid: str):
    """JSON for API clients; the same URL is a page for browsers (content negotiation on Accept)."""
    svc = get_service()
    html = request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"
    g.html = html  # errors on this request render as HTML for browsers
    game = svc.game(parse_appid(appid))  # a 404 before any 304: an unknown game has no answer to hold
    names = strategies_param(svc)
    hi = max(1, min(svc.max_k(n) for n in names))
    k = int_param("k", min(8 if html else 10, hi), hi)  # the default capped to the tables, as for /match
    host = host_url()
    etag = svc.http_cache.etag("compare", game.appid, ",".join(names), k, html, host)

    def build() -> Response:
        payload = svc.compare_payload(names, game, k, host)
        return make_response(render_template("compare.html", payload=payload)) if html else jsonify(payload)

    resp = _cached(etag, build)
    resp.vary.add("Accept")
    return resp


@bp.get("/health")
def health():
    """Facts true for the whole service: the index, and the models loaded by live workers (from the metrics)."""
    uptime = round(time.time() - current_app.config["STARTED_AT"], 1)
    svc = current_app.extensions.get(EXTENSION_KEY)
    if svc is None:  # a fetched index not ready yet (app/boot.py)
        body = {"status": "starting", "detail": starting().message, "uptime_s": uptime}
        return jsonify(body), 503, {"Retry-After": "5"}
    by_workers = metrics.models_loaded_by_workers(svc.matcher.loaded_backbones())
    probe = request.environ.get("serving.ready")  # gunicorn's worker (serving.worker): (serving, configured) workers
    ready, workers = probe() if probe is not None else (1, 1)
    body = jsonify(
        {
            "status": "ok" if ready >= workers else "starting",
            "workers_ready": ready,
            "workers": workers,
            "apps": len(svc.catalog),
            "strategies": svc.strategy_names,
            "default_strategy": svc.default_strategy,
            "index_created": svc.index.manifest.get("created"),
            "index_build": svc.build_id,
            "models_loaded": sorted(by_workers),
            "models_loaded_workers": by_workers,
            "uptime_s": uptime,
        }
    )
    return body, 200 if ready >= workers else 503  # ready means every worker serves
