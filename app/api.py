"""The JSON API: similar games by appid (tables) or by uploaded image (embedded on demand).

Parameters are parsed by ``app/params.py`` and failures raised as domain problems, which ``app/errors.py`` turns
into 4xx JSON bodies with stable codes; responses are built from the memory-mapped tables without copying them.
Answers read from the tables carry an ``ETag`` and ``Cache-Control`` (``app/http_cache.py``); a matching
``If-None-Match`` gets a 304.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request

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


def _json(body: str | dict, etag: str) -> Response:
    """A precomputed answer: JSON with its ETag and Cache-Control."""
    resp = current_app.response_class(body, mimetype="application/json") if isinstance(body, str) else jsonify(body)
    return get_service().http_cache.mark(resp, etag)


def _cached_json(etag: str, build: Callable[[], str | dict]) -> Response:
    """304 when the client holds this ETag; else the JSON ``build()`` makes, with its ETag."""
    cached = get_service().http_cache.not_modified(etag)
    return cached if cached is not None else _json(build(), etag)


def _cached_png(etag: str, build: Callable[[], bytes]) -> Response:
    """304 when the client holds this ETag; else the PNG ``build()`` makes, with its ETag."""
    cache = get_service().http_cache
    cached = cache.not_modified(etag)
    return cached if cached is not None else cache.mark(current_app.response_class(build(), mimetype="image/png"), etag)


@bp.get("/match/<appid>")
def match_appid(appid: str):
    svc = get_service()
    app_id = parse_appid(appid)
    strategy = strategy_param(svc)
    k = k_param(svc, strategy)
    offset = offset_param(svc, strategy)
    variant = variant_param()
    svc.check_variant(strategy, variant)
    game = svc.catalog.get(app_id)
    if game is None:
        return jsonify(svc.fallback_match(app_id, strategy, k, host_url(), offset, variant))
    host = host_url()
    etag = svc.http_cache.etag("m", app_id, strategy, k, offset, variant, host)
    return _cached_json(etag, lambda: svc.table_payload_json(strategy, game, k, host, offset, variant))


@bp.get("/match")
def match_batch():
    """Many lookups in one request: ``/match?appids=620,400`` (at most MAX_BATCH appids)."""
    svc = get_service()
    appids = appids_param("appids", svc.settings.max_batch)
    strategy = strategy_param(svc)
    k = k_param(svc, strategy)
    offset = offset_param(svc, strategy)
    variant = variant_param()
    svc.check_variant(strategy, variant)
    host = host_url()
    etag = svc.http_cache.etag("b", ",".join(map(str, appids)), strategy, k, offset, variant, host)
    return _cached_json(etag, lambda: svc.batch_payload_json(strategy, appids, k, host, offset, variant))


@bp.post("/match")
def match_upload():
    """An image to embed: uploaded (multipart or raw ``image/*``), or fetched from a URL (JSON ``{"url": ...}``)."""
    svc = get_service()
    strategy = strategy_param(svc)
    k = k_param(svc, strategy)
    offset = offset_param(svc, strategy)
    variant = variant_param()
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
    q = text_param("q")
    limit = int_param("limit")
    host = host_url()
    etag = svc.http_cache.etag("search", q, limit, host)

    def build():
        games = svc.catalog.search(q, limit)
        return {"query": q, "results": [svc.catalog.describe_row(g.row, host) for g in games]}

    return _cached_json(etag, build)


@bp.get("/unique")
def unique():
    svc = get_service()
    strategy = strategy_param(svc)
    total = max(1, len(svc.catalog))
    n = int_param("n", hi=total)
    offset = int_param("offset", 0, total - 1)
    host = host_url()
    etag = svc.http_cache.etag("unique", strategy, n, offset, host)

    def build():
        games = svc.unique_payload(strategy, n, host, offset)
        return {"strategy": strategy, "n": len(games), "offset": offset, "games": games}

    return _cached_json(etag, build)


@bp.get("/compare/<appid>")
def compare(appid: str):
    """JSON for API clients; the same URL is a page for browsers (content negotiation on Accept)."""
    svc = get_service()
    html = request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"
    g.html = html  # errors on this request render as HTML for browsers
    app_id = parse_appid(appid)
    names = strategies_param(svc)
    k = int_param("k", 8 if html else 10, max(1, min(svc.max_k(n) for n in names)))
    host = host_url()
    etag = svc.http_cache.etag("compare", app_id, ",".join(names), k, html, host)
    cached = svc.http_cache.not_modified(etag)
    if cached is None:
        payload = svc.compare_payload(names, svc.game(app_id), k, host)
        if html:
            descriptions = {n: svc.describe_strategy(n) for n in names}
            page = render_template("compare.html", payload=payload, descriptions=descriptions)
            cached = svc.http_cache.mark(current_app.response_class(page, mimetype="text/html"), etag)
        else:
            cached = _json(payload, etag)
    cached.vary.add("Accept")
    return cached


@bp.get("/health")
def health():
    """Facts true for the whole service: the index, and the models loaded by live workers (from the metrics)."""
    started = current_app.config["STARTED_AT"]
    svc = current_app.extensions.get(EXTENSION_KEY)
    if svc is None:  # a fetched index not ready yet (app/boot.py)
        detail = starting().message
        body = {"status": "starting", "detail": detail, "uptime_s": round(time.time() - started, 1)}
        return jsonify(body), 503, {"Retry-After": "5"}
    by_workers = metrics.models_loaded_by_workers(svc.matcher.loaded_backbones())
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
            "index_build": svc.build_id,
            "models_loaded": sorted(by_workers),
            "models_loaded_workers": by_workers,
            "uptime_s": round(time.time() - started, 1),
        }
    )
    body.status_code = 200 if ready >= workers else 503  # ready means every worker serves
    return body


def _workers_ready() -> tuple[int, int]:
    """(serving workers, configured workers) from gunicorn's worker (serving.worker); (1, 1) elsewhere."""
    probe = request.environ.get("serving.ready")
    return probe() if probe is not None else (1, 1)
