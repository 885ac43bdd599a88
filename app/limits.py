"""The upload rate limit (UPLOAD_RATE_LIMIT), with Flask-Limiter: a moving window per client address.

One limit for every request that runs a model pass (``needs_model_pass``): uploads, the "why alike?" maps of a
pair and lookups that fetch and embed a banner from the CDN (FALLBACK_FETCH). ``memory://`` counts in each
worker, ``redis://host:port`` once for every worker and dyno; an unreachable store lets requests through (logged).
"""

from __future__ import annotations

import ipaddress

from flask import Flask, current_app, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import HTTPException

from .config import Settings
from .params import EXTENSION_KEY, parse_appid, strategy_value, variant_param
from .problems import Problem

MODEL_ENDPOINTS = ("api.match_upload", "pages.upload", "api.why", "api.why_png")  # every request runs a model pass


def install(app: Flask, settings: Settings) -> None:
    """Charge the model endpoints (and, with FALLBACK_FETCH, lookups that fetch a banner) to one shared limit."""
    if settings.upload_rate_limit is None:
        return
    count, seconds = settings.upload_rate_limit
    limiter = Limiter(
        client_key,
        app=app,
        storage_uri=settings.rate_limit_storage_uri,
        strategy="moving-window",
        headers_enabled=True,
        swallow_errors=True,
    )
    charged = limiter.shared_limit(f"{count} per {int(seconds)} second", scope="uploads", exempt_when=_not_charged)
    for endpoint in (*MODEL_ENDPOINTS, "api.match_appid") if settings.fallback_fetch else MODEL_ENDPOINTS:
        app.view_functions[endpoint] = charged(app.view_functions[endpoint])  # the check runs in the wrapper


def client_key() -> str:
    """Whom the limit counts: the client's IPv4 address, or its IPv6 /64 (one host's, which it may rotate through)."""
    addr = get_remote_address()
    try:
        ip = ipaddress.ip_address(addr.split("%")[0])
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _not_charged() -> bool:
    """The limit's exemption, in the view's wrapper: on the route Flask matched, not matched again."""
    svc = current_app.extensions.get(EXTENSION_KEY)
    return not _routed_needs_model_pass(svc, request.endpoint, request.view_args or {}, request.args)


def needs_model_pass(app: Flask, environ: dict) -> bool:
    """Whether a request runs a model pass: an upload, a pair's /why, or a lookup of a game that is not in the
    index whose banner is fetched from the CDN (FALLBACK_FETCH, not cached yet).

    The serving worker runs these in its heavy pool. It decides on the route as Flask matches it, so an
    absolute-form target or a percent-encoded path is classified as routed.
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
    return _routed_needs_model_pass(svc, endpoint, view_args, app.request_class(environ).args)


def _routed_needs_model_pass(svc, endpoint: str | None, view_args: dict, args) -> bool:
    """``needs_model_pass`` of a routed request; the rate limit, in the view's wrapper, asks it of Flask's match."""
    if endpoint in MODEL_ENDPOINTS:
        return True
    if endpoint != "api.match_appid" or svc is None or svc.fetcher is None:
        return False
    try:
        appid = parse_appid(view_args["appid"])
        if svc.catalog.get(appid) is not None:  # every lookup of an indexed game, whatever its parameters
            return False
        strategy = strategy_value(svc, args.get("strategy"))
        variant = variant_param(args)
    except Problem:
        return False  # the view answers it with its 4xx
    return svc.fetcher.needs_fetch(appid, strategy, variant)
