"""The one place where failures become HTTP: ``{"error": {"code": "...", "message": "..."}}`` and a status.

Domain problems (``app/problems.py``) and ``ImageRejected`` answer as JSON, or as a small HTML page for the pages.
Every failure a client can cause is a 4xx with a stable code; a 500 is an unexpected fault, logged.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, g, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from core.images import ImageRejected

from . import problems

log = logging.getLogger(__name__)

# werkzeug's status codes, named as our API names them
_HTTP_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    415: "unsupported_media_type",
    429: "rate_limited",
}


STATUS = {
    problems.BadRequest: 400,
    problems.Forbidden: 403,
    problems.NotFound: 404,
    problems.UnsupportedUpload: 415,
    problems.UpstreamFailed: 502,
    problems.Unavailable: 503,
}


def _wants_html() -> bool:
    """HTML for the pages, and for a browser on a URL that matched no route; JSON for everything else."""
    if "html" in g:
        return bool(g.html)
    if request.url_rule is None:  # an unknown URL (or method): answer in the format the client prefers
        return request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html"
    return request.blueprint == "pages"


def error_response(status: int, code: str, message: str, extra: dict | None = None) -> Response:
    if _wants_html():
        return Response(render_template("error.html", status=status, code=code, message=message), status=status)
    resp = jsonify(error={"code": code, "message": message, **(extra or {})})
    resp.status_code = status
    return resp


def _too_large(app: Flask) -> tuple[str, str]:
    """Which limit a 413 is about: the body's size, or (a form within the size limit) its parts."""
    declared = request.content_length
    within = declared is not None and declared <= app.config["MAX_CONTENT_LENGTH"]
    if request.mimetype == "multipart/form-data" and within:
        parts, field_kb = request.max_form_parts, (request.max_form_memory_size or 0) // 1024
        return "too_many_form_parts", (
            f"the form has more than {parts} parts or a text field over {field_kb} KB; "
            "send one file field named 'image' (and optionally 'strategy')"
        )
    return "too_large", f"the upload is larger than the {app.config['MAX_UPLOAD_MB']:g} MB limit"


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(problems.Problem)
    def _problem(e: problems.Problem):
        status = next(STATUS[kind] for kind in type(e).__mro__ if kind in STATUS)
        resp = error_response(status, e.code, e.message, e.extra)
        if e.retry_after is not None:
            resp.headers["Retry-After"] = str(e.retry_after)
        return resp

    @app.errorhandler(ImageRejected)
    def _image_rejected(e: ImageRejected):
        return error_response(400, e.code, e.message)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        status = e.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = e.description or e.name
        if status == 413:
            code, message = _too_large(app)
        if status == 404 and request.blueprint is None:
            message = (
                f"there is no page at {request.path}"
                if _wants_html()
                else f"no such endpoint: {request.path} (see GET /health and the README for the API)"
            )
        if status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        if status == 429:
            message = f"too many uploads from this address (limit: {message}); see Retry-After"
        resp = error_response(status, code, message)
        if status == 405 and getattr(e, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(e.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "internal_error", "an unexpected error occurred; it has been logged")
