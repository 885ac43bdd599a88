"""Similar Steam games by banner: the Flask application factory.

``create_app()`` reads the settings (app/config.py), loads and checks the index folder (core/index) and registers
the JSON API and the pages; a bad setting or an index that cannot be served stops it with a ``StartupError``.
With ``INDEX_URL`` the index is fetched in the background instead (app/boot.py), answering 503 ``starting`` until then.
"""

from __future__ import annotations

import logging
import time
from urllib.parse import urlsplit

from flask import Flask, request
from flask_compress import Compress
from werkzeug.middleware.proxy_fix import ProxyFix

from core.index import IndexInvalid, LoadedIndex, load_index

from .config import ConfigError, Settings


class StartupError(RuntimeError):
    """The service cannot start; the message says why and what to do."""


SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "same-origin"),
)
NON_HTML_POLICY = "default-src 'none'; frame-ancestors 'none'"


def create_app(settings: Settings | None = None) -> Flask:
    """The app over the local index (loaded and checked now), or, with INDEX_URL, one that fetches it first."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings or Settings.from_env()
    except ConfigError as e:
        raise StartupError(str(e)) from e
    app = _flask_app(settings)
    if settings.index_url:
        from .boot import start_fetching

        start_fetching(app, settings, lambda index: _install(app, settings, index))
        logging.getLogger(__name__).info("fetching the index from %s into %s", settings.index_url, settings.index_dir)
        return app
    try:
        _install(app, settings, load_index(settings.index_dir, verify=settings.index_verify))
    except (IndexInvalid, ValueError) as e:
        raise StartupError(str(e)) from e
    return app


def _install(app: Flask, settings: Settings, index: LoadedIndex):
    """The service over the index, put in the app (from then on every endpoint serves); says what is served."""
    from . import metrics
    from .params import EXTENSION_KEY
    from .service import Service

    service = app.extensions[EXTENSION_KEY] = Service(settings, index)
    metrics.index_loaded(len(index), service.build_id, index.manifest.get("created"))
    logging.getLogger(__name__).info(
        "serving %d apps, strategies %s (default %s) from %s",
        len(index),
        ", ".join(index.strategies),
        service.default_strategy,
        settings.index_dir,
    )
    return service


def _flask_app(settings: Settings) -> Flask:
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["MAX_UPLOAD_MB"] = settings.max_upload_mb
    app.config["STARTED_AT"] = time.time()
    app.config["SERVING"] = _serving_limits(app, settings)
    app.config["SERVES"] = lambda: _serves(app)  # serving.worker: /health counts this worker ready only then
    app.json.sort_keys = False
    app.json.compact = True
    if settings.proxy_hops:
        n = settings.proxy_hops
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n, x_port=n)
    prefix = urlsplit(settings.public_url).path.rstrip("/") if settings.public_url else ""
    if prefix:
        app.wsgi_app = _mounted_at(app.wsgi_app, prefix)

    from . import api, docs, limits, metrics, pages
    from .errors import register_error_handlers

    register_error_handlers(app)
    metrics.install(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(docs.bp)
    limits.install(app, settings)
    _register_cors(app, settings.cors_origins)
    _register_compression(app)

    # banners come from the store's CDN, or from PUBLIC_URL, which may name another host than the page's
    urls = [url for url in (settings.assets_url, settings.public_url) if url]
    banner_origins = " ".join("/".join(url.split("/", 3)[:3]) for url in urls)
    html_policy = (  # pages, /compare for browsers, error pages: no scripts, images from here or the CDN
        f"default-src 'self'; img-src 'self' data: {banner_origins}; style-src 'self'; script-src 'none'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
    )

    @app.after_request
    def _security_headers(resp):
        """On every response, JSON and images included; a view's own policy (/docs) is kept."""
        for name, value in SECURITY_HEADERS:
            resp.headers.setdefault(name, value)
        html = resp.mimetype == "text/html"
        resp.headers.setdefault("Content-Security-Policy", html_policy if html else NON_HTML_POLICY)
        return resp

    return app


def _serves(app: Flask) -> bool:
    """Whether the app has its service (with INDEX_URL, not until the fetched index is installed: app/boot.py)."""
    from .params import EXTENSION_KEY

    return EXTENSION_KEY in app.extensions


def _mounted_at(wsgi_app, prefix: str):
    """PUBLIC_URL's path (``/app`` of https://example.com/app/) as the script root: behind a proxy that serves the
    app there, the pages' links, stylesheet, forms and redirects (``url_for``) keep it, as banner URLs do."""

    def call(environ, start_response):
        environ["SCRIPT_NAME"] = prefix
        return wsgi_app(environ, start_response)

    return call


def _register_compression(app: Flask) -> None:
    """gzip for JSON, HTML and CSS over 1 KB (flask-compress), when the client accepts it; level 1: nearly level
    6's size at a fraction of its CPU time."""
    app.config.update(
        COMPRESS_MIMETYPES=["application/json", "text/html", "text/css"],
        COMPRESS_MIN_SIZE=1024,
        COMPRESS_ALGORITHM=["gzip"],
        COMPRESS_LEVEL=1,
        COMPRESS_STREAMS=False,
    )
    Compress(app)


def _serving_limits(app: Flask, settings: Settings) -> dict:
    """What gunicorn's worker (serving.worker.BufferedWorker) enforces before and around the app; requests
    that run a model pass (``limits.needs_model_pass``) run in its bounded, low-priority thread pool."""
    from .limits import needs_model_pass

    return {
        "header_timeout": settings.header_timeout,
        "body_timeout": settings.upload_timeout,
        "max_body_bytes": settings.max_upload_bytes,
        "max_buffered_bytes": int(settings.upload_buffer_mb * 2**20),
        "heavy_slots": settings.upload_concurrency,
        "heavy_queue": settings.upload_queue,
        "queue_timeout": settings.upload_queue_timeout,
        "is_heavy": lambda environ: needs_model_pass(app, environ),
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
