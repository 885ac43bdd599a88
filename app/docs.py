"""The API's own description: ``/openapi.json`` (OpenAPI 3.1) and ``/docs``, a page rendered from it here.

The page is server-rendered from the same document, with no JavaScript and nothing from a CDN, so its
Content-Security-Policy forbids scripts like the other pages'.
"""

from __future__ import annotations

import json

from flask import Blueprint, current_app, render_template

from .openapi import document, specialise
from .params import get_service

bp = Blueprint("docs", __name__)
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'; script-src 'none'"
)
CACHE = "public, max-age=300"


def _document() -> dict:
    """The OpenAPI document narrowed to this service's index, made once per app; read only."""
    doc = current_app.extensions.get("openapi_document")
    if doc is None:
        svc = get_service()
        max_k = min(svc.max_k(n) for n in svc.strategy_names)
        variants = all(svc.index.strategies[n].variants for n in svc.strategy_names)
        doc = specialise(document(), svc.strategy_names, max_k, len(svc.catalog), svc.settings.max_batch, variants)
        current_app.extensions["openapi_document"] = doc
    return doc


@bp.get("/openapi.json")
def openapi_json():
    body = json.dumps(_document(), indent=1)
    return current_app.response_class(body, mimetype="application/json", headers={"Cache-Control": CACHE})


@bp.get("/docs")
def docs_page():
    doc = _document()
    operations = [
        {"method": method.upper(), "path": path, **op}
        for path, item in doc["paths"].items()
        for method, op in item.items()
    ]
    page = render_template(
        "docs.html",
        doc=doc,
        operations=operations,
        schemas=doc["components"]["schemas"],
        dumps=lambda v: json.dumps(v, ensure_ascii=False),
    )
    return page, {"Content-Security-Policy": CSP, "Cache-Control": CACHE}
