"""The OpenAPI 3.1 description of this service, served at ``/openapi.json`` and rendered at ``/docs``.

Written by hand and held to the code by the tests: every Flask route appears here, the README's API table lists
the same operations, and a property-based run against the live service checks answers against the schemas.
"""

from __future__ import annotations

import copy
from typing import Any

from .params import PARAMS

JSON = "application/json"
HTML = "text/html"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str] | None = None, **props: Any) -> dict:
    """An object schema of these properties; all of them required unless ``required`` names some."""
    return {"type": "object", "required": list(props) if required is None else required, "properties": props}


def _list(items: dict) -> dict:
    return {"type": "array", "items": items}


INT = {"type": "integer"}
STR = {"type": "string"}
NUM = {"type": "number"}
BINARY = {"type": "string", "format": "binary"}
ERROR = {
    **_obj(code=STR, message=STR),
    "additionalProperties": True,
    "description": "code: stable and machine-readable; message: for people; extra fields (parameter, available, "
    "appid) where they help",
}

MAP = {
    "grid": {**_list(INT), "minItems": 2, "maxItems": 2, "description": "[rows, columns] of patches"},
    "map": {**_list(_list(NUM)), "description": "one value per patch, row by row"},
}
SCHEMAS: dict[str, dict] = {
    "Error": _obj(error=ERROR),
    "Map": _obj(**MAP),
    "Attention": {
        **_obj(appid=INT, strategy=STR, **MAP),
        "description": "the last block's [CLS] attention to each patch, averaged over the heads",
    },
    "Why": _obj(
        strategy=STR,
        score={**NUM, "description": "the pair's cosine"},
        score_from={
            "enum": ["table", "embeddings"],
            "description": "a's table, or their embeddings when b is not in it",
        },
        a={"allOf": [_ref("Game"), _ref("Map")], "description": "each patch's best cosine to b's patches"},
        b={"allOf": [_ref("Game"), _ref("Map")], "description": "each patch's best cosine to a's patches"},
    ),
    "Game": _obj(appid=INT, name=STR, store_url=STR, banner_url=STR),
    "Match": {
        "allOf": [_ref("Game"), _obj(rank={"type": "integer", "minimum": 1}, score=NUM)],
        "description": "rank counts from 1 across pages (offset + 1 is the first rank of a page)",
    },
    "UploadQuery": _obj(upload={"const": True}, width=INT, height=INT, format=STR, bytes=INT, sha256=STR),
    "MatchAnswer": _obj(
        ["strategy", "k", "offset", "query", "matches"],
        strategy=STR,
        k={"type": "integer", "minimum": 0, "description": "matches in this answer"},
        offset={"type": "integer", "minimum": 0},
        variant={"enum": ["mirror", "flip", "mirror+flip"]},
        query={"anyOf": [_ref("Game"), _ref("UploadQuery")]},
        matches=_list(_ref("Match")),
        embedding={**_list(NUM), "description": "with embedding=1 on an upload: its L2-normalised vector"},
        attention={**_ref("Map"), "description": "with attention=1 on an upload: its attention map"},
    ),
    "BatchError": _obj(appid=INT, error=_obj(code=STR, message=STR)),
    "BatchAnswer": _obj(
        strategy=STR,
        k=INT,
        offset=INT,
        variant=STR,
        results=_list({"anyOf": [_ref("MatchAnswer"), _ref("BatchError")]}),
    ),
    "Strategy": _obj(
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
        variants={**_list(STR), "description": "mirror/flip tables built for lookups"},
        default={"type": "boolean"},
    ),
    "Strategies": _obj(default=STR, strategies=_list(_ref("Strategy"))),
    "AppInfo": {"allOf": [_ref("Game"), _obj(strategies=_list(STR))]},
    "Search": _obj(query=STR, results=_list(_ref("Game"))),
    "UniqueGame": {"allOf": [_ref("Game"), _obj([], best_match=_obj(appid=INT, name=STR, score=NUM))]},
    "Unique": _obj(strategy=STR, n=INT, offset=INT, games=_list(_ref("UniqueGame"))),
    "Compare": _obj(
        query=_ref("Game"),
        k=INT,
        strategies=_list(STR),
        matches={"type": "object", "additionalProperties": _list(_ref("Match"))},
        overlap={"type": "object", "additionalProperties": {"type": "object", "additionalProperties": NUM}},
        in_all=_list(INT),
    ),
    "Health": _obj(
        ["status", "apps", "strategies", "default_strategy", "models_loaded"],
        status=STR,
        apps=INT,
        strategies=_list(STR),
        default_strategy=STR,
        index_created={"type": ["string", "null"]},
        index_build=STR,
        models_loaded={**_list(STR), "description": "backbones loaded in any live worker"},
        models_loaded_workers={"type": "object", "additionalProperties": INT, "description": "workers per backbone"},
        workers_ready=INT,
        workers=INT,
        uptime_s=NUM,
    ),
}


ERRORS = {
    "400": "bad parameter, appid, upload or URL (code says which)",
    "403": "url_fetch_disabled, url_not_allowed",
    "404": "unknown_appid, not_found; no_banner, attention_unavailable (an index built without attention maps)",
    "405": "method_not_allowed",
    "408": "upload_timeout: the upload stalled or took too long",
    "413": "too_large",
    "415": "unsupported_media_type",
    "429": "rate_limited (UPLOAD_RATE_LIMIT), with Retry-After",
    "502": "fallback_failed, url_fetch_failed, url_too_large, url_fetch_timeout: a server we fetch from",
    "503": "weights_unavailable: model passes need the checkpoint; lookups keep working. busy: no model slot",
}
CACHED = {"ETag": {"schema": STR}, "Cache-Control": {"schema": STR}}


def _json(schema: str, description: str, cached: bool = False) -> dict:
    out: dict = {"description": description, "content": {JSON: {"schema": _ref(schema)}}}
    return out | {"headers": CACHED} if cached else out


def _body(description: str, media: str = HTML, schema: dict = STR) -> dict:
    return {"description": description, "content": {media: {"schema": schema}}}


def _param(name: str, about: dict[str, str]) -> dict:
    """A parameter as app/params.py declares it; ``name!`` is a required query parameter."""
    required, name = name.endswith("!"), name.rstrip("!")
    schema, description = PARAMS[name]
    where = "path" if name in ("appid", "other", "filename") else "query"
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": about.get(name, description),
    }


def _op(
    summary: str,
    params: str,
    answer: dict,
    errors: str = "",
    html: bool = False,
    about: dict[str, str] | None = None,
    status: str = "200",
    **extra: Any,
) -> dict:
    """An operation: ``params`` names PARAMS entries (``about``: this operation's own sense of some), ``answer``
    its success (a cached one can also be a 304), ``errors`` its error statuses, HTML for the pages."""
    responses = {status: answer}
    if "headers" in answer:
        responses["304"] = {"description": "If-None-Match named this answer's ETag"}
    for code in errors.split():
        responses[code] = _body(ERRORS[code]) if html else _json("Error", ERRORS[code])
    parameters = [_param(name, about or {}) for name in params.split()]
    return {"summary": summary, "parameters": parameters, "responses": responses, **extra}


UPLOAD_FORM = {
    "schema": _obj(["image"], image=BINARY),
    "encoding": {"image": {"contentType": "image/jpeg, image/png, image/webp, image/gif, image/bmp"}},
}
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": UPLOAD_FORM,
        "image/jpeg": {"schema": BINARY},
        "image/png": {"schema": BINARY},
        JSON: {
            "schema": {
                **_obj(["url"], url={"type": "string", "pattern": "^https?://\\S+$", "description": "an image's URL"}),
                "additionalProperties": False,
            },
            "description": "query by URL: fetched by the service when URL_FETCH=1 (public addresses only)",
        },
    },
}
LOOKUP = "strategy k offset mirror flip"
MATCHES = _json("MatchAnswer", "matches", cached=True)
COMPARE = _json("Compare", "JSON, or a page when Accept prefers text/html", cached=True)
COMPARE["content"][HTML] = {"schema": STR}
PNG = {**_body("PNG", "image/png"), "headers": CACHED}
PAGE = _body("page")
TO_GALLERY = {"description": "to /render/<appid>"}

INFO = {
    "title": "Steam banners, alike",
    "version": "1",
    "description": "Similar Steam games by their store banners, with DINO vision transformers. "
    'Errors are JSON {"error": {"code", "message", ...}} with the status listed per operation.',
}
OPERATIONS: dict[str, dict[str, dict]] = {  # tag: {"method path": operation}
    "lookups": {
        "get /match/{appid}": _op(
            "The k most similar games, from the precomputed table", f"appid {LOOKUP}", MATCHES, "400 404 502"
        ),
        "get /match": _op(
            "Batch lookup: several appids in one request (at most MAX_BATCH, default 50)",
            f"appids! {LOOKUP}",
            _json("BatchAnswer", "one answer (or error) per appid, in order", cached=True),
            "400",
        ),
        "get /unique": _op(
            "Games whose best match is least similar, least similar first",
            "strategy n offset",
            _json("Unique", "games", cached=True),
            "400",
            about={"offset": "skip this many games"},
        ),
        "get /compare/{appid}": _op(
            "Each strategy's matches for a game, and their overlap (HTML for browsers: Vary: Accept)",
            "appid strategies k",
            COMPARE,
            "400 404",
            about={"k": "default 10 (8 in HTML)"},
        ),
    },
    "uploads": {
        "post /match": _op(
            'An image embedded on demand (upload, or JSON {"url"}), searched exactly',
            f"{LOOKUP} embedding attention",
            _json("MatchAnswer", "matches; Server-Timing splits decode, preprocess, forward, search"),
            "400 403 408 413 415 429 502 503",
            requestBody=UPLOAD_BODY,
        ),
    },
    "attention": {
        "get /attention/{appid}": _op(
            "A game's attention map, from the index", "appid strategy", _json("Attention", "map", True), "400 404"
        ),
        "get /attention/{appid}.png": _op(
            "The banner at its size, the map drawn where the model looks", "appid strategy", PNG, "400 404"
        ),
        "get /why/{appid}/{other}": _op(
            "Which parts of two banners match",
            "appid other strategy",
            _json("Why", "score and maps", cached=True),
            "400 404 429 503",
        ),
        "get /why/{appid}/{other}.png": _op(
            "The two banners side by side, each with its map", "appid other strategy", PNG, "400 404 429 503"
        ),
    },
    "index": {
        "get /strategies": _op("The built strategies", "", _json("Strategies", "strategies", cached=True)),
        "get /apps/{appid}": _op(
            "One game: name, store and banner URLs", "appid", _json("AppInfo", "the game", cached=True), "400 404"
        ),
        "get /apps": _op(
            "Search games by name (case- and accent-insensitive, ranked)",
            "q! limit",
            _json("Search", "games", cached=True),
            "400",
        ),
    },
    "service": {
        "get /health": _op("Service state, true for every worker", "", _json("Health", "ok")),
        "get /metrics": _op(
            "Prometheus metrics, merged across workers", "", _body("Prometheus text format", "text/plain")
        ),
        "get /openapi.json": _op("This document", "", _body("OpenAPI 3.1", JSON, {"type": "object"})),
        "get /docs": _op("This document as a page", "", _body("the API reference")),
    },
    "pages": {
        "get /": _op(
            "Home page: search by name, upload form, the most unique banners",
            "q",
            PAGE,
            about={"q": "name to search for"},
        ),
        "get /render/{appid}": _op(
            "A game's matches as a gallery",
            "appid strategy k attention",
            PAGE,
            "400 404",
            html=True,
            about={"attention": "1: what the model looks at"},
        ),
        "get /random": _op(
            "A redirect to a random game's gallery (heroku-flask-api's /render/ without an appid)",
            "strategy",
            TO_GALLERY,
            "400",
            html=True,
            status="302",
        ),
        "get /pair/{appid}/{other}": _op(
            "Why two games are alike: their banners coloured by how well each part matches",
            "appid other strategy",
            PAGE,
            "400 404",
            html=True,
        ),
        "get /render/": _op("The same as /random", "strategy", TO_GALLERY, "400", html=True, status="302"),
        "post /upload": _op(
            "The upload form's result page",
            "strategy k",
            PAGE,
            "400 408 413 415 429 503",
            html=True,
            requestBody={"required": True, "content": {"multipart/form-data": UPLOAD_FORM}},
        ),
        "get /banners/{appid}.jpg": _op(
            "A banner from the service's banner folder", "appid", _body("the banner", "image/jpeg"), "404"
        ),
        "get /static/{filename}": _op(
            "The pages' stylesheet and other static files", "filename", {"description": "the file"}, "404"
        ),
    },
}


def document() -> dict:
    """The OpenAPI document (a new dict each call)."""
    paths: dict[str, dict] = {}
    for tag, ops in OPERATIONS.items():
        for key, op in ops.items():
            method, path = key.split(" ")
            paths.setdefault(path, {})[method] = {"tags": [tag], **op}
    return copy.deepcopy({"openapi": "3.1.0", "info": INFO, "paths": paths, "components": {"schemas": SCHEMAS}})


def specialise(doc: dict, strategies: list[str], max_k: int, apps: int, max_batch: int, variants: bool) -> dict:
    """``doc`` narrowed, in place, to this service's index: its strategy names and the widths of its tables.

    What the generic document allows and this index refuses (a k past the table width, an unknown
    strategy) then no longer counts as valid, so clients and generated tests see the real contract.
    """
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
