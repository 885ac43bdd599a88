"""``GET /match/<appid>``, the API's hottest route, answered without Flask's per-request machinery.

A lookup is a precomputed answer: a few slices of the tables and some string joins. Through Flask
it also pays for a request context, URL routing, a Response object and five after-request hooks,
which together cost more than the answer (README "Serving"). This WSGI middleware answers the
plain form of it directly, with the service's own code (parameters from ``app/params.py``, the
body from ``Service.table_payload_json``, the ETag from ``app/http_cache.py``) and the headers the
hooks would add, and counts it in the metrics like any other request.

Only requests whose answer is certain take this path: ``GET``, no ``If-None-Match``, ``Origin`` or
``Accept-Encoding`` (304s, CORS and gzip stay with Flask's hooks), only ``k`` and ``strategy`` in
the query, in plain characters, with valid values, and an appid in the index. Everything else,
errors included, goes to Flask, which gives the same answers: ``tests/test_fast_lookups.py``
compares the two byte for byte, headers included, in every configuration that changes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flask import Flask

from .metrics import observe_request
from .params import EXTENSION_KEY, host_url, k_value, parse_appid, strategy_value
from .problems import Problem

PREFIX = "/match/"
ENDPOINT = "/match/<appid>"  # the route's rule: the metrics' label
_PARAMS = frozenset(("k", "strategy"))
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_DEFER_HEADERS = ("HTTP_IF_NONE_MATCH", "HTTP_ORIGIN", "HTTP_ACCEPT_ENCODING")

StartResponse = Callable[..., object]


class FastLookups:
    """WSGI middleware in front of the Flask app: plain lookups here, everything else to ``wsgi_app``."""

    def __init__(self, app: Flask, wsgi_app: Callable, headers: list[tuple[str, str]]) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.headers = headers  # what the after-request hooks add to a JSON answer without Origin or gzip

    def __call__(self, environ: dict, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        answer = self.answer(environ)
        if answer is None:
            return self.wsgi_app(environ, start_response)
        headers, body = answer
        start_response("200 OK", headers)
        observe_request(ENDPOINT, "GET", 200, started)
        return [body]

    def answer(self, environ: dict) -> tuple[list[tuple[str, str]], bytes] | None:
        """The lookup's headers and body, or None when Flask should answer this request."""
        path = environ.get("PATH_INFO", "")
        if (
            not path.startswith(PREFIX)
            or environ.get("REQUEST_METHOD") != "GET"
            or environ.get("SCRIPT_NAME")
            or any(name in environ for name in _DEFER_HEADERS)
        ):
            return None
        svc = self.app.extensions.get(EXTENSION_KEY)
        query = plain_query(environ.get("QUERY_STRING", ""))
        if svc is None or query is None:
            return None
        try:
            appid = parse_appid(path[len(PREFIX) :])
            strategy = strategy_value(svc, query.get("strategy"))
            k = k_value(svc, strategy, query.get("k"))
        except Problem:
            return None  # Flask answers the 400 with the same parsing
        game = svc.catalog.get(appid)
        if game is None:
            return None  # not indexed: the CDN fallback, Flask's
        host = host_url(svc)
        etag = svc.http_cache.etag("m", appid, strategy, k, 0, "", host)
        body = svc.table_payload_json(strategy, game, k, host).encode()
        head = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("ETag", etag),
            ("Cache-Control", svc.http_cache.cache_control),
        ]
        return head + self.headers, body


def plain_query(query: str) -> dict[str, str] | None:
    """``k`` and ``strategy`` from a query string of plain characters, each at most once; else None."""
    values: dict[str, str] = {}
    if not query:
        return values
    for part in query.split("&"):
        name, eq, value = part.partition("=")
        if not eq or name not in _PARAMS or name in values or not _PLAIN.issuperset(value):
            return None
        values[name] = value
    return values
