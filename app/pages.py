"""HTML pages: search by name, upload an image, and galleries of similar banners.

Server-rendered templates without JavaScript: the pages work everywhere, and the Content-Security-Policy
forbids scripts outright. Errors on these routes render as HTML (the API's codes and messages).
"""

from __future__ import annotations

import base64
import io
import random

from flask import Blueprint, abort, g, redirect, render_template, request, send_file, url_for
from PIL import Image

from core.steam import is_ascii_digits

from .params import (
    APPID_DIGITS,
    PARAMS,
    flag_param,
    get_service,
    host_url,
    k_param,
    parse_appid,
    strategy_param,
    strategy_value,
)
from .problems import NotFound
from .uploads import read_upload

bp = Blueprint("pages", __name__)

MORE_STEP = 20  # "Show more" on a gallery adds this many matches


@bp.app_template_filter("similarity")
def similarity(score: float) -> str:
    """A cosine as people read it: 0.8803 is "88%"."""
    return f"{score * 100:.0f}%"


@bp.app_template_global("strategy_info")
def strategy_info(name: str) -> dict:
    """``Service.describe_strategy`` and the strategy in plain words: a template global, so that every page
    (/compare's too, rendered by the API's view) says the same."""
    svc = get_service()
    return svc.describe_strategy(name) | {"plain": svc.index.strategies[name].strategy.describe_plain()}


def more_links(k: int, max_k: int) -> list[tuple[str, int]]:
    """(label, k) of the "Show more" links under a gallery of k matches, up to the table's max_k."""
    if k >= max_k:
        return []
    step = min(MORE_STEP, max_k - k)
    links = [(f"Show {step} more", k + step)]
    if k + step < max_k:
        links.append((f"Show all {max_k}", max_k))
    return links


@bp.get("/")
def home():
    svc = get_service()
    q = (request.args.get("q") or "").strip()[: PARAMS["q"][0]["maxLength"]]
    return render_template(
        "index.html",
        q=q,
        results=svc.search_payload(q, 40, host_url()) if q else [],
        unique=svc.unique_payload(svc.default_strategy, 12, host_url())["games"],
        strategies=[strategy_info(n) for n in svc.strategy_names],
        default_strategy=svc.default_strategy,
        apps=len(svc.catalog),
        max_upload_mb=svc.settings.max_upload_mb,
    )


@bp.get("/render/<appid>")
def render(appid: str):
    svc = get_service()
    app_id = parse_appid(appid)
    strategy = strategy_param(svc)
    k = k_param(svc, strategy, default=20)
    payload = svc.table_payload(strategy, svc.game(app_id), k, host_url())
    more = more_links(k, svc.max_k(strategy))
    return _gallery(svc, payload, strategy, k, upload=None, more=more, looks=flag_param("attention"))


@bp.get("/pair/<appid>/<other>")
def pair(appid: str, other: str):
    """Why two games are alike: their banners, each part coloured by how well it matches the other banner."""
    svc = get_service()
    a, b, strategy = svc.game(parse_appid(appid)), svc.game(parse_appid(other)), strategy_param(svc)
    for game in (a, b):
        svc.banner_file(game)  # the picture needs both banners: a 404 here rather than a broken image
    score, _ = svc.pair_score(strategy, a, b)
    games = [svc.catalog.describe_row(g.row, host_url()) for g in (a, b)]
    return render_template("pair.html", games=games, score=score, strategy=strategy)


@bp.get("/render/")
@bp.get("/random")  # registered first: the URL that url_for builds
def random_game():
    """A redirect to the gallery of a game picked at random (heroku-flask-api's /render/ without an appid)."""
    svc = get_service()
    if not len(svc.catalog):
        raise NotFound("empty_index", "the index has no games")
    game = svc.catalog.game(random.randrange(len(svc.catalog)))
    args = {"strategy": strategy_param(svc)} if request.args.get("strategy") else {}
    resp = redirect(url_for("pages.render", appid=game.appid, **args))
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.post("/upload")
def upload():
    svc = get_service()
    strategy = strategy_param(svc)
    if request.form.get("strategy"):
        strategy = strategy_value(svc, request.form["strategy"])
    k = k_param(svc, strategy, default=20)
    data = read_upload()
    payload, _, uploaded = svc.upload_payload(data, strategy, k, host_url())
    thumb = _thumbnail_data_url(uploaded.image)
    # an upload is not stored: there is no page to ask for more of it
    return _gallery(svc, payload, strategy, k, upload=thumb, more=[])


def _gallery(svc, payload: dict, strategy: str, k: int, upload: str | None, more: list, looks: bool = False) -> str:
    """The gallery page of a game's matches (``upload`` None) or of an uploaded image's (its thumbnail);
    ``looks``: each banner shows what the model looks at, when the index has the maps."""
    # the maps are drawn over the banner folder's files: no view to offer when none of this page's banners is there
    shown = [payload["query"], *payload["matches"]] if upload is None else []
    local = any(svc.catalog.has_local_banner(game["appid"]) for game in shown)
    has_attention = svc.index.strategies[strategy].attention is not None and local
    return render_template(
        "gallery.html",
        payload=payload,
        upload=upload,
        strategies=[strategy_info(n) for n in svc.strategy_names],
        strategy=strategy,
        k=k,
        more=more,
        looks=looks and has_attention,
        has_attention=has_attention,
        has_banner=svc.catalog.has_local_banner,
    )


@bp.get("/banners/<appid>.jpg")
def banner(appid: str):
    g.html = False  # an image URL: errors in JSON, like the API
    svc = get_service()
    path = svc.catalog.banner_file(int(appid)) if is_ascii_digits(appid) and len(appid) <= APPID_DIGITS else None
    if path is None:
        abort(404)
    return send_file(path, max_age=86400, conditional=True)


def _thumbnail_data_url(image: Image.Image) -> str:
    """A small JPEG of the upload for the result page (the upload itself is never stored)."""
    thumb = image.copy()
    thumb.thumbnail((300, 450))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
