"""The OpenAPI 3.1 description of this service, served at ``/openapi.json`` and rendered at ``/docs``.

Written by hand, next to the code it describes, and held to it by the tests:
every Flask route must appear here (tests/test_openapi.py walks
``app.url_map``), the README's API table must list the same operations, and
a property-based run against the live service checks that answers fit the
schemas below.
"""

from __future__ import annotations

from typing import Any

JSON = "application/json"
HTML = "text/html"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **props: Any) -> dict:
    return {"type": "object", "required": required, "properties": props}


INT = {"type": "integer"}
STR = {"type": "string"}
NUM = {"type": "number"}

SCHEMAS: dict[str, dict] = {
    "Error": _obj(
        ["error"],
        error={
            **_obj(["code", "message"], code=STR, message=STR),
            "additionalProperties": True,
            "description": "code: stable and machine-readable; message: for people; extra fields "
            "(parameter, available, appid) where they help",
        },
    ),
    "Game": _obj(["appid", "name", "store_url", "banner_url"], appid=INT, name=STR, store_url=STR, banner_url=STR),
    "Match": {
        "allOf": [_ref("Game"), _obj(["rank", "score"], rank={"type": "integer", "minimum": 1}, score=NUM)],
        "description": "rank counts from 1 across pages (offset + 1 is the first rank of a page)",
    },
    "UploadQuery": _obj(
        ["upload", "width", "height", "format", "bytes", "sha256"],
        upload={"const": True},
        width=INT,
        height=INT,
        format=STR,
        bytes=INT,
        sha256=STR,
    ),
    "MatchAnswer": _obj(
        ["strategy", "k", "offset", "query", "matches"],
        strategy=STR,
        k={"type": "integer", "minimum": 0, "description": "matches in this answer"},
        offset={"type": "integer", "minimum": 0},
        variant={"enum": ["mirror", "flip", "mirror+flip"]},
        query={"anyOf": [_ref("Game"), _ref("UploadQuery")]},
        matches={"type": "array", "items": _ref("Match")},
        embedding={
            "type": "array",
            "items": NUM,
            "description": "with embedding=1 on an upload: its L2-normalised vector",
        },
    ),
    "BatchError": _obj(["appid", "error"], appid=INT, error=_obj(["code", "message"], code=STR, message=STR)),
    "BatchAnswer": _obj(
        ["strategy", "k", "offset", "variant", "results"],
        strategy=STR,
        k=INT,
        offset=INT,
        variant=STR,
        results={"type": "array", "items": {"anyOf": [_ref("MatchAnswer"), _ref("BatchError")]}},
    ),
    "Strategy": {
        **_obj(
            ["name", "description", "backbone", "dim", "k", "variants", "default"],
            name=STR,
            description=STR,
            style=STR,
            backbone=STR,
            dim=INT,
            k=INT,
            preprocessing=STR,
            params={"type": "object"},
            checkpoint={"type": ["string", "null"]},
            variants={"type": "array", "items": STR, "description": "mirror/flip tables built for lookups"},
            default={"type": "boolean"},
        ),
    },
    "Strategies": _obj(["default", "strategies"], default=STR, strategies={"type": "array", "items": _ref("Strategy")}),
    "AppInfo": {"allOf": [_ref("Game"), _obj(["strategies"], strategies={"type": "array", "items": STR})]},
    "Search": _obj(["query", "results"], query=STR, results={"type": "array", "items": _ref("Game")}),
    "UniqueGame": {
        "allOf": [
            _ref("Game"),
            {
                "type": "object",
                "properties": {"best_match": _obj(["appid", "name", "score"], appid=INT, name=STR, score=NUM)},
            },
        ]
    },
    "Unique": _obj(
        ["strategy", "n", "offset", "games"],
        strategy=STR,
        n=INT,
        offset=INT,
        games={"type": "array", "items": _ref("UniqueGame")},
    ),
    "Compare": _obj(
        ["query", "k", "strategies", "matches", "overlap", "in_all"],
        query=_ref("Game"),
        k=INT,
        strategies={"type": "array", "items": STR},
        matches={"type": "object", "additionalProperties": {"type": "array", "items": _ref("Match")}},
        overlap={"type": "object", "additionalProperties": {"type": "object", "additionalProperties": NUM}},
        in_all={"type": "array", "items": INT},
    ),
    "Health": _obj(
        ["status", "apps", "strategies", "default_strategy", "models_loaded"],
        status=STR,
        apps=INT,
        strategies={"type": "array", "items": STR},
        default_strategy=STR,
        index_created={"type": ["string", "null"]},
        index_build=STR,
        models_loaded={"type": "array", "items": STR, "description": "backbones loaded in any live worker"},
        models_loaded_workers={"type": "object", "additionalProperties": INT, "description": "workers per backbone"},
        workers_ready=INT,
        workers=INT,
        uptime_s=NUM,
    ),
}


def _param(name: str, where: str, schema: dict, description: str, required: bool = False) -> dict:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


APPID = _param("appid", "path", {"type": "integer", "minimum": 0, "maximum": 9_999_999_999}, "a Steam appid")
STRATEGY = _param("strategy", "query", STR, "strategy name, case-insensitive (GET /strategies); default ComplexB16")
K = _param("k", "query", {"type": "integer", "minimum": 1}, "matches per answer, 1 to the table width (default 10)")
OFFSET = _param(
    "offset",
    "query",
    {"type": "integer", "minimum": 0},
    "skip this many matches: pages through the table (offset + k may reach the table width)",
)
FLAG = {"type": "integer", "enum": [0, 1]}
MIRROR = _param(
    "mirror",
    "query",
    FLAG,
    "1: query with the banner mirrored left to right (lookups need "
    "an index built with --variants mirror,flip; uploads are transformed before embedding)",
)
FLIP = _param("flip", "query", FLAG, "1: query with the banner flipped upside down (as mirror)")
EMBEDDING = _param("embedding", "query", FLAG, "1: return the upload's L2-normalised embedding")


def _error(description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


ERRORS = {
    "400": _error("bad parameter, appid, upload or URL (code says which)"),
    "403": _error("url_fetch_disabled, url_not_allowed"),
    "404": _error("unknown_appid, not_found"),
    "405": _error("method_not_allowed"),
    "408": _error("upload_timeout: the upload stalled or took too long"),
    "413": _error("too_large"),
    "415": _error("unsupported_media_type"),
    "429": _error("rate_limited (UPLOAD_RATE_LIMIT), with Retry-After"),
    "502": _error("fallback_failed, url_fetch_failed, url_too_large, url_fetch_timeout: a server we fetch from"),
    "503": _error("weights_unavailable: uploads need the checkpoint; lookups keep working"),
}
CACHED = {"ETag": {"schema": STR}, "Cache-Control": {"schema": STR}}


def _ok(schema: str, description: str, cached: bool = False, media: str = JSON) -> dict:
    out: dict = {"description": description, "content": {media: {"schema": _ref(schema)}}}
    if cached:
        out["headers"] = CACHED
    return out


def _html(description: str) -> dict:
    return {"description": description, "content": {HTML: {"schema": STR}}}


def _errors(*codes: str) -> dict:
    return {c: ERRORS[c] for c in codes}


def _page_errors(*codes: str) -> dict:
    """The pages answer errors as HTML (same codes and messages as the API)."""
    return {c: _html(ERRORS[c]["description"]) for c in codes}


NOT_MODIFIED = {"304": {"description": "If-None-Match named this answer's ETag"}}


def _op(summary: str, params: list[dict], responses: dict, tag: str = "lookups", **extra: Any) -> dict:
    return {"summary": summary, "tags": [tag], "parameters": params, "responses": responses, **extra}


UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": _obj(["image"], image={"type": "string", "format": "binary"}),
            "encoding": {"image": {"contentType": "image/jpeg, image/png, image/webp, image/gif, image/bmp"}},
        },
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        JSON: {
            "schema": {
                **_obj(["url"], url={"type": "string", "pattern": "^https?://\\S+$", "description": "an image's URL"}),
                "additionalProperties": False,
            },
            "description": "query by URL: fetched by the service when URL_FETCH=1 (public addresses only)",
        },
    },
}


def _match_paths() -> dict:
    """The lookups by appid and the upload search (GET and POST /match)."""
    table_params = [STRATEGY, K, OFFSET, MIRROR, FLIP]
    return {
        "/match/{appid}": {
            "get": _op(
                "The k most similar games, from the precomputed table",
                [APPID, *table_params],
                {"200": _ok("MatchAnswer", "matches", cached=True), **NOT_MODIFIED, **_errors("400", "404", "502")},
            )
        },
        "/match": {
            "get": _op(
                "Batch lookup: several appids in one request (at most MAX_BATCH, default 50)",
                [
                    _param(
                        "appids",
                        "query",
                        {"type": "string", "pattern": "^[0-9]+(,[0-9]+)*$"},
                        "comma-separated appids, e.g. 620,400",
                        required=True,
                    ),
                    *table_params,
                ],
                {
                    "200": _ok("BatchAnswer", "one answer (or error) per appid, in order", cached=True),
                    **NOT_MODIFIED,
                    **_errors("400"),
                },
            ),
            "post": _op(
                'An image embedded on demand (upload, or JSON {"url"}), searched exactly',
                [STRATEGY, K, OFFSET, MIRROR, FLIP, EMBEDDING],
                {
                    "200": _ok("MatchAnswer", "matches; Server-Timing splits decode, preprocess, forward, search"),
                    **_errors("400", "403", "408", "413", "415", "429", "502", "503"),
                },
                tag="uploads",
                requestBody=UPLOAD_BODY,
            ),
        },
    }


def _index_paths() -> dict:
    """What the index holds: strategies and games."""
    return {
        "/strategies": {
            "get": _op(
                "The built strategies",
                [],
                {"200": _ok("Strategies", "strategies", cached=True), **NOT_MODIFIED},
                tag="index",
            )
        },
        "/apps/{appid}": {
            "get": _op(
                "One game: name, store and banner URLs",
                [APPID],
                {"200": _ok("AppInfo", "the game", cached=True), **NOT_MODIFIED, **_errors("400", "404")},
                tag="index",
            )
        },
        "/apps": {
            "get": _op(
                "Search games by name (case- and accent-insensitive, ranked)",
                [
                    _param(
                        "q",
                        "query",
                        {"type": "string", "minLength": 1, "maxLength": 200},
                        "name or part of it",
                        required=True,
                    ),
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": 100}, "default 20"),
                ],
                {"200": _ok("Search", "games", cached=True), **NOT_MODIFIED, **_errors("400")},
                tag="index",
            )
        },
    }


def _ranking_paths() -> dict:
    """Lookups across the whole table: the most unique games, strategies compared."""
    return {
        "/unique": {
            "get": _op(
                "Games whose best match is least similar, least similar first",
                [
                    STRATEGY,
                    _param("n", "query", {"type": "integer", "minimum": 1}, "default 20"),
                    _param("offset", "query", {"type": "integer", "minimum": 0}, "skip this many games"),
                ],
                {"200": _ok("Unique", "games", cached=True), **NOT_MODIFIED, **_errors("400")},
            )
        },
        "/compare/{appid}": {
            "get": _op(
                "Each strategy's matches for a game, and their overlap (HTML for browsers: Vary: Accept)",
                [
                    APPID,
                    _param("strategies", "query", STR, "comma-separated strategies (default: all)"),
                    _param("k", "query", {"type": "integer", "minimum": 1}, "default 10 (8 in HTML)"),
                ],
                {
                    "200": {
                        "description": "JSON, or a page when Accept prefers text/html",
                        "headers": CACHED,
                        "content": {JSON: {"schema": _ref("Compare")}, HTML: {"schema": STR}},
                    },
                    **NOT_MODIFIED,
                    **_errors("400", "404"),
                },
            )
        },
    }


def _service_paths() -> dict:
    """The service's own state and this document."""
    return {
        "/health": {
            "get": _op("Service state, true for every worker", [], {"200": _ok("Health", "ok")}, tag="service")
        },
        "/metrics": {
            "get": _op(
                "Prometheus metrics, merged across workers",
                [],
                {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": STR}}}},
                tag="service",
            )
        },
        "/openapi.json": {
            "get": _op(
                "This document",
                [],
                {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}},
                tag="service",
            )
        },
        "/docs": {"get": _op("This document as a page", [], {"200": _html("the API reference")}, tag="service")},
    }


def _gallery_paths() -> dict:
    """The HTML pages: home, gallery and random redirect."""
    return {
        "/": {
            "get": _op(
                "Home page: search by name, upload form, the most unique banners",
                [_param("q", "query", STR, "name to search for")],
                {"200": _html("page")},
                tag="pages",
            )
        },
        "/render/{appid}": {
            "get": _op(
                "A game's matches as a gallery",
                [APPID, STRATEGY, K],
                {"200": _html("page"), **_page_errors("400", "404")},
                tag="pages",
            )
        },
        "/random": {
            "get": _op(
                "A redirect to a random game's gallery (heroku-flask-api's /render/ without an appid)",
                [STRATEGY],
                {"302": {"description": "to /render/<appid>"}, **_page_errors("400")},
                tag="pages",
            )
        },
        "/render/": {
            "get": _op(
                "The same as /random",
                [STRATEGY],
                {"302": {"description": "to /render/<appid>"}, **_page_errors("400")},
                tag="pages",
            )
        },
    }


def _file_paths() -> dict:
    """The upload form's page, banners and static files."""
    return {
        "/upload": {
            "post": _op(
                "The upload form's result page",
                [STRATEGY, K],
                {"200": _html("page"), **_page_errors("400", "408", "413", "415", "429", "503")},
                tag="pages",
                requestBody={
                    "required": True,
                    "content": {"multipart/form-data": UPLOAD_BODY["content"]["multipart/form-data"]},
                },
            )
        },
        "/banners/{appid}.jpg": {
            "get": _op(
                "A banner from the service's banner folder",
                [APPID],
                {"200": {"description": "the banner", "content": {"image/jpeg": {"schema": STR}}}, **_errors("404")},
                tag="pages",
            )
        },
        "/static/{filename}": {
            "get": _op(
                "The pages' stylesheet and other static files",
                [_param("filename", "path", STR, "e.g. style.css")],
                {"200": {"description": "the file"}, **_errors("404")},
                tag="pages",
            )
        },
    }


def _paths() -> dict:
    """Every path, in the order the document lists them."""
    return {
        **_match_paths(),
        **_index_paths(),
        **_ranking_paths(),
        **_service_paths(),
        **_gallery_paths(),
        **_file_paths(),
    }


def document(version: str = "1") -> dict:
    """The OpenAPI document (a new dict each call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Steam banners, alike",
            "version": version,
            "description": "Similar Steam games by their store banners, with DINO vision transformers. "
            'Errors are JSON {"error": {"code", "message", ...}} with the status listed per operation.',
        },
        "paths": _paths(),
        "components": {"schemas": SCHEMAS},
    }


def operations(doc: dict) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in a document, paths as Flask writes them (``/match/<appid>``)."""
    out = set()
    for path, item in doc["paths"].items():
        for method in item:
            out.add((method.upper(), path.replace("{", "<").replace("}", ">")))
    return out


def specialise(doc: dict, strategies: list[str], max_k: int, apps: int, max_batch: int, variants: bool) -> dict:
    """The document narrowed to this service's index: its strategy names and the widths of its tables.

    What the generic document allows and this index refuses (a k past the table width, an unknown
    strategy) then no longer counts as valid, so clients and generated tests see the real contract.
    """
    import copy

    doc = copy.deepcopy(doc)
    names = "|".join(strategies)
    narrowed = {
        "strategy": {"enum": strategies},
        "strategies": {"pattern": f"^({names})(,({names}))*$"},
        "k": {"maximum": max(1, max_k)},
        "appids": {"pattern": f"^[0-9]{{1,10}}(,[0-9]{{1,10}}){{0,{max_batch - 1}}}$"},
        "n": {"maximum": max(1, apps)},
        "q": {"pattern": "\\S"},
    }
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for p in op["parameters"]:
                p["schema"] = {**p["schema"], **narrowed.get(p["name"], {})}  # schemas are shared: new dicts
                if p["name"] == "offset":
                    p["schema"]["maximum"] = max(0, (apps if path == "/unique" else max_k) - 1)
                if p["name"] in ("mirror", "flip") and method == "get" and not variants:
                    p["schema"]["enum"] = [0]  # lookups need --variants tables, which this index lacks
    return doc
