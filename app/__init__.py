"""Similar Steam games by banner: the Flask application factory.

``create_app()`` reads the settings from the environment (app/config.py),
loads and checks the index folder (app/index.py), and registers the JSON API
(app/api.py) and the HTML pages (app/pages.py). A bad setting or an index
that cannot be served stops it with a ``StartupError`` naming the problem.
"""

from __future__ import annotations

import logging
import time

from flask import Flask, request
from werkzeug.middleware.proxy_fix import ProxyFix

from core.index import IndexInvalid, load_index

from .config import ConfigError, Settings


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to do."""


def create_app(settings: Settings | None = None) -> Flask:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings or Settings.from_env()
        index = load_index(settings.index_dir, verify=settings.index_verify)
        from .params import EXTENSION_KEY
        from .service import Service

        service = Service(settings, index)
    except (ConfigError, IndexInvalid, ValueError) as e:
        raise StartupError(str(e)) from e

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["MAX_UPLOAD_MB"] = settings.max_upload_mb
    app.config["STARTED_AT"] = time.time()
    app.config["SERVING"] = _serving_limits(settings, service)
    app.json.sort_keys = False
    app.json.compact = True
    app.extensions[EXTENSION_KEY] = service
    if settings.proxy_hops:
        n = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)

    from . import api, pages
    from .errors import register_error_handlers

    register_error_handlers(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    _register_cors(app, settings.cors_origins)

    @app.after_request
    def _security_headers(resp):
        """On every response, JSON and images included; the pages set their own CSP first (kept)."""
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'")
        return resp

    logging.getLogger(__name__).info(
        "serving %d apps, strategies %s (default %s) from %s",
        len(index),
        ", ".join(index.strategies),
        service.default_strategy,
        settings.index_dir,
    )
    return app


def _serving_limits(settings: Settings, service) -> dict:
    """What gunicorn's worker (serving.worker.BufferedWorker) enforces before and around the app.

    Heavy requests (a model pass: uploads, and lookups of unknown appids when the CDN fallback is on)
    run in the worker's bounded, low-priority thread pool; everything else inline.
    """

    def is_heavy(method: str, path: str) -> bool:
        if method not in ("GET", "HEAD", "OPTIONS"):
            return True
        if service.fetcher is None or not path.startswith("/match/"):
            return False
        appid = path[len("/match/") :]
        return not (appid.isdigit() and appid.isascii() and service.catalog.get(int(appid)) is not None)

    return {
        "header_timeout": settings.header_timeout,
        "body_timeout": settings.upload_timeout,
        "max_body_bytes": settings.max_upload_bytes,
        "heavy_slots": settings.upload_concurrency,
        "heavy_queue": settings.upload_queue,
        "queue_timeout": settings.upload_queue_timeout,
        "is_heavy": is_heavy,
    }


def _register_cors(app: Flask, origins: list[str]) -> None:
    """Cross-origin access for the configured origins only (none by default; '*' for any)."""
    if not origins:
        return
    allow_any = "*" in origins

    @app.before_request
    def _preflight():
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            return app.make_default_options_response()
        return None

    @app.after_request
    def _cors(resp):
        origin = request.headers.get("Origin")
        if origin and (allow_any or origin in origins):
            resp.headers["Access-Control-Allow-Origin"] = "*" if allow_any else origin
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = "Content-Type"
            resp.headers["Access-Control-Expose-Headers"] = "Server-Timing, Retry-After"
            resp.headers["Access-Control-Max-Age"] = "3600"
        resp.vary.add("Origin")  # the answer depends on Origin (present or not, allowed or not): caches must key on it
        return resp
