"""The upload rate limit (UPLOAD_RATE_LIMIT), with Flask-Limiter: a moving window per client address.

One limit for every way to send an image (POST /match, the upload page) and for lookups that fetch and embed a
banner from the CDN (FALLBACK_FETCH). RATE_LIMIT_STORAGE_URI ``memory://`` (the default) counts in each worker, so
W workers allow up to W times the limit; ``redis://host:port`` counts once for every worker and dyno. An
unreachable store lets requests through (logged).
"""

from __future__ import annotations

from flask import Flask, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from .config import Settings

UPLOAD_ENDPOINTS = ("api.match_upload", "pages.upload")


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
    for endpoint in UPLOAD_ENDPOINTS:
        if endpoint in app.view_functions:
            app.view_functions[endpoint] = shared(app.view_functions[endpoint])  # the check runs in the wrapper
    if settings.fallback_fetch:
        charged = limiter.shared_limit(rate, scope="uploads", exempt_when=_no_model_pass)
        app.view_functions["api.match_appid"] = charged(app.view_functions["api.match_appid"])
    return limiter


def _no_model_pass() -> bool:
    """A lookup that reads the tables (or a cached fallback) costs no model pass: not counted."""
    from .params import get_service, parse_appid, strategy_param, variant_param
    from .problems import Problem

    try:
        svc = get_service()
        appid = parse_appid((request.view_args or {}).get("appid", ""))
        if svc.catalog.get(appid) is not None:  # every lookup of an indexed game, whatever its parameters
            return True
        strategy, variant = strategy_param(svc), variant_param()
    except Problem:
        return True  # the view answers it with its 4xx or 503
    return not svc.fallback_needs_fetch(appid, strategy, variant)
