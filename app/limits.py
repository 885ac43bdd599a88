"""The upload rate limit (UPLOAD_RATE_LIMIT), with Flask-Limiter: a moving window per client address.

One limit for every way to send an image (POST /match, the upload page), for the "why alike?" maps of a pair
(/why: two forward passes) and for lookups that fetch and embed a banner from the CDN (FALLBACK_FETCH).
RATE_LIMIT_STORAGE_URI ``memory://`` (the default) counts in each worker, so W workers allow up to W times the
limit; ``redis://host:port`` counts once for every worker and dyno. An
unreachable store lets requests through (logged). ``needs_model_pass`` says which requests run a model pass: this
limit charges them, and the serving worker runs them in its heavy pool.
"""

from __future__ import annotations

from flask import Flask, current_app, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException

from core.env import parse_bool
from core.variants import TRANSFORMS, variant_name

from .config import Settings
from .params import EXTENSION_KEY, parse_appid, strategy_value
from .problems import Problem

UPLOAD_ENDPOINTS = ("api.match_upload", "pages.upload")
MODEL_ENDPOINTS = (*UPLOAD_ENDPOINTS, "api.why", "api.why_png")  # every request to these runs a model pass


def install(app: Flask, settings: Settings) -> Limiter | None:
    rate = settings.upload_rate_limit_text
    if rate is None:
        return None
    limiter = Limiter(
        get_remote_address,
        app=app,
        storage_uri=settings.rate_limit_storage_uri,
        strategy="moving-window",
        headers_enabled=True,
        swallow_errors=True,
        default_limits=[],
    )
    shared = limiter.shared_limit(rate, scope="uploads")
    for endpoint in MODEL_ENDPOINTS:
        if endpoint in app.view_functions:
            app.view_functions[endpoint] = shared(app.view_functions[endpoint])  # the check runs in the wrapper
    if settings.fallback_fetch:
        charged = limiter.shared_limit(
            rate, scope="uploads", exempt_when=lambda: not needs_model_pass(current_app, request.environ)
        )
        app.view_functions["api.match_appid"] = charged(app.view_functions["api.match_appid"])
    return limiter


def needs_model_pass(app: Flask, environ: dict) -> bool:
    """Whether a request runs a model pass: an upload, a pair's /why, or a lookup of a game that is not in the
    index whose banner is fetched from the CDN (FALLBACK_FETCH, not cached yet).

    The rate limit charges these, and the serving worker runs them in its heavy pool. Both decide on the
    route as Flask matches it, so an absolute-form target or a percent-encoded path is classified as routed.
    """
    svc = app.extensions.get(EXTENSION_KEY)  # None while a fetched index is not ready
    fallback = svc is not None and svc.fetcher is not None
    method = environ.get("REQUEST_METHOD")
    light_get = method in ("GET", "HEAD") and not fallback and "/why/" not in environ.get("PATH_INFO", "")
    if method == "OPTIONS" or light_get:
        return False  # uploads are POSTs and /why the one GET with a model pass: no routing needed for the rest
    try:
        endpoint, view_args = app.url_map.bind_to_environ(environ).match()
    except HTTPException:  # 404, 405, a redirect: answered without a model
        return False
    if endpoint in MODEL_ENDPOINTS:
        return True
    if endpoint != "api.match_appid" or not fallback:
        return False
    args = app.request_class(environ).args
    try:
        appid = parse_appid(view_args["appid"])
        if svc.catalog.get(appid) is not None:  # every lookup of an indexed game, whatever its parameters
            return False
        strategy = strategy_value(svc, args.get("strategy"))
        variant = variant_name([t for t in TRANSFORMS if parse_bool(t, args.get(t), False)])
    except (Problem, ValueError):
        return False  # the view answers it with its 4xx
    return svc.fallback_needs_fetch(appid, strategy, variant)
