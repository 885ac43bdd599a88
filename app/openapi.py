"""The OpenAPI 3.1 description of this service, served at ``/openapi.json`` and rendered at ``/docs``.

Written by hand, next to the code it describes, and held to it by the tests: every Flask route must appear here
(tests/test_openapi.py walks ``app.url_map``), the README's API table must list the same operations, and a
property-based run against the live service checks that answers fit the schemas below.
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


def _param(name: str, description: str | None = None, required: bool = False) -> dict:
    """A parameter as app/params.py declares it (``description`` for this operation's own sense of it)."""
    schema, about = PARAMS[name]
    where = "path" if name in ("appid", "other", "filename") else "query"
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description or about,
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


def _ok(schema: str, description: str, cached: bool = False) -> dict:
    out: dict = {"description": description, "content": {JSON: {"schema": _ref(schema)}}}
    return out | {"headers": CACHED} if cached else out


def _html(description: str) -> dict:
    return {"description": description, "content": {HTML: {"schema": STR}}}


def _answers(first: dict, *codes: str, html: bool = False) -> dict:
    """The answers of an operation: ``first`` ({status: answer}), then 304 and error statuses; the pages
    answer errors as HTML (same codes and messages as the API)."""
    out = dict(first)
    for code in codes:
        if code == "304":
            out[code] = {"description": "If-None-Match named this answer's ETag"}
        else:
            out[code] = _html(ERRORS[code]) if html else _ok("Error", ERRORS[code])
    return out


def _op(tag: str, summary: str, params: list[dict], responses: dict, **extra: Any) -> dict:
    return {"summary": summary, "tags": [tag], "parameters": params, "responses": responses, **extra}


UPLOAD_FORM = {
    "schema": _obj(["image"], image={"type": "string", "format": "binary"}),
    "encoding": {"image": {"contentType": "image/jpeg, image/png, image/webp, image/gif, image/bmp"}},
}
UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": UPLOAD_FORM,
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
    """Lookups and uploads."""
    lookup = [_param(n) for n in ("strategy", "k", "offset", "mirror", "flip")]
    matches = _ok("MatchAnswer", "matches", cached=True)
    return {
        "/match/{appid}": {
            "get": _op(
                "lookups",
                "The k most similar games, from the precomputed table",
                [_param("appid"), *lookup],
                _answers({"200": matches}, "304", "400", "404", "502"),
            )
        },
        "/match": {
            "get": _op(
                "lookups",
                "Batch lookup: several appids in one request (at most MAX_BATCH, default 50)",
                [_param("appids", required=True), *lookup],
                _answers({"200": _ok("BatchAnswer", "one answer (or error) per appid, in order", True)}, "304", "400"),
            ),
            "post": _op(
                "uploads",
                'An image embedded on demand (upload, or JSON {"url"}), searched exactly',
                [*lookup, _param("embedding"), _param("attention")],
                _answers(
                    {"200": _ok("MatchAnswer", "matches; Server-Timing splits decode, preprocess, forward, search")},
                    *("400", "403", "408", "413", "415", "429", "502", "503"),
                ),
                requestBody=UPLOAD_BODY,
            ),
        },
    }


def _why_paths() -> dict:
    """What the model looks at, and which parts of two banners match (/why: two forward passes, like an upload)."""
    one, two = [_param("appid"), _param("strategy")], [_param("appid"), _param("other"), _param("strategy")]
    png = {"description": "PNG", "content": {"image/png": {"schema": STR}}, "headers": CACHED}
    stored, model = ("304", "400", "404"), ("304", "400", "404", "429", "503")
    ops = {  # path: (parameters, summary, answer, error statuses)
        "/attention/{appid}": (one, "A game's attention map, from the index", _ok("Attention", "map", True), stored),
        "/attention/{appid}.png": (one, "The banner at its size, the map drawn where the model looks", png, stored),
        "/why/{appid}/{other}": (two, "Which parts of two banners match", _ok("Why", "score and maps", True), model),
        "/why/{appid}/{other}.png": (two, "The two banners side by side, each with its map", png, model),
    }
    return {
        path: {"get": _op("attention", summary, params, _answers({"200": answer}, *codes))}
        for path, (params, summary, answer, codes) in ops.items()
    }


def _index_paths() -> dict:
    """What the index holds, and rankings over it."""
    compare = _ok("Compare", "JSON, or a page when Accept prefers text/html", cached=True)
    compare["content"][HTML] = {"schema": STR}
    return {
        "/strategies": {
            "get": _op(
                "index", "The built strategies", [], _answers({"200": _ok("Strategies", "strategies", True)}, "304")
            )
        },
        "/apps/{appid}": {
            "get": _op(
                "index",
                "One game: name, store and banner URLs",
                [_param("appid")],
                _answers({"200": _ok("AppInfo", "the game", True)}, "304", "400", "404"),
            )
        },
        "/apps": {
            "get": _op(
                "index",
                "Search games by name (case- and accent-insensitive, ranked)",
                [_param("q", required=True), _param("limit")],
                _answers({"200": _ok("Search", "games", True)}, "304", "400"),
            )
        },
        "/unique": {
            "get": _op(
                "lookups",
                "Games whose best match is least similar, least similar first",
                [_param("strategy"), _param("n"), _param("offset", "skip this many games")],
                _answers({"200": _ok("Unique", "games", True)}, "304", "400"),
            )
        },
        "/compare/{appid}": {
            "get": _op(
                "lookups",
                "Each strategy's matches for a game, and their overlap (HTML for browsers: Vary: Accept)",
                [_param("appid"), _param("strategies"), _param("k", "default 10 (8 in HTML)")],
                _answers({"200": compare}, "304", "400", "404"),
            )
        },
    }


def _service_paths() -> dict:
    """The service's own state and this document."""
    text = {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": STR}}}}
    return {
        "/health": {"get": _op("service", "Service state, true for every worker", [], {"200": _ok("Health", "ok")})},
        "/metrics": {"get": _op("service", "Prometheus metrics, merged across workers", [], text)},
        "/openapi.json": {
            "get": _op(
                "service",
                "This document",
                [],
                {"200": {"description": "OpenAPI 3.1", "content": {JSON: {"schema": {"type": "object"}}}}},
            )
        },
        "/docs": {"get": _op("service", "This document as a page", [], {"200": _html("the API reference")})},
    }


def _page(summary: str, params: list, answers: dict, method: str = "get", **extra) -> dict:
    return {method: _op("pages", summary, params, answers, **extra)}


def _page_paths() -> dict:
    """The HTML pages, banners and static files."""
    to_gallery = _answers({"302": {"description": "to /render/<appid>"}}, "400", html=True)
    page = {"200": _html("page")}
    return {
        "/": _page(
            "Home page: search by name, upload form, the most unique banners", [_param("q", "name to search for")], page
        ),
        "/render/{appid}": _page(
            "A game's matches as a gallery",
            [_param("appid"), _param("strategy"), _param("k"), _param("attention", "1: what the model looks at")],
            _answers(page, "400", "404", html=True),
        ),
        "/random": _page(
            "A redirect to a random game's gallery (heroku-flask-api's /render/ without an appid)",
            [_param("strategy")],
            to_gallery,
        ),
        "/pair/{appid}/{other}": _page(
            "Why two games are alike: their banners coloured by how well each part matches",
            [_param("appid"), _param("other"), _param("strategy")],
            _answers(page, "400", "404", html=True),
        ),
        "/render/": _page("The same as /random", [_param("strategy")], to_gallery),
        "/upload": _page(
            "The upload form's result page",
            [_param("strategy"), _param("k")],
            _answers(page, "400", "408", "413", "415", "429", "503", html=True),
            method="post",
            requestBody={"required": True, "content": {"multipart/form-data": UPLOAD_FORM}},
        ),
        "/banners/{appid}.jpg": _page(
            "A banner from the service's banner folder",
            [_param("appid")],
            _answers({"200": {"description": "the banner", "content": {"image/jpeg": {"schema": STR}}}}, "404"),
        ),
        "/static/{filename}": _page(
            "The pages' stylesheet and other static files",
            [_param("filename")],
            _answers({"200": {"description": "the file"}}, "404"),
        ),
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
        "paths": {**_match_paths(), **_why_paths(), **_index_paths(), **_service_paths(), **_page_paths()},
        "components": {"schemas": SCHEMAS},
    }


def operations(doc: dict) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation in a document, paths as Flask writes them (``/match/<appid>``)."""
    return {(m.upper(), path.replace("{", "<").replace("}", ">")) for path, item in doc["paths"].items() for m in item}


def specialise(doc: dict, strategies: list[str], max_k: int, apps: int, max_batch: int, variants: bool) -> dict:
    """The document narrowed to this service's index: its strategy names and the widths of its tables.

    What the generic document allows and this index refuses (a k past the table width, an unknown
    strategy) then no longer counts as valid, so clients and generated tests see the real contract.
    """
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
