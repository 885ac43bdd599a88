"""The HTML pages through Flask's test client: game details, similarity, show more, random game, HTML errors."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest

from app.pages import more_links
from core.dino.strategies import parse_strategy

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


def apps_of(built_index) -> list[dict]:
    return json.loads((built_index.index / "apps.json").read_text())


def text_of(resp) -> str:
    return html.unescape(resp.get_data(as_text=True))


def test_gallery_shows_similarity_as_people_read_it(client, built_index):
    apps = apps_of(built_index)
    nbr = np.load(built_index.index / "SimpleS16" / "neighbours.npy")
    sco = np.load(built_index.index / "SimpleS16" / "scores.npy")
    page = text_of(client.get("/render/40?strategy=SimpleS16&k=6"))
    assert "Similarity: how alike the DINO model finds two banners" in page  # the legend
    cards = page.split('class="card"')[1:]
    assert len(cards) == 6
    for rank, (card, row, score) in enumerate(zip(cards, nbr[3, :6], sco[3, :6], strict=True), 1):
        name = apps[row]["name"]
        assert f"#{rank} · {score * 100:.0f}% alike" in card
        assert f'<meter min="0" max="1" value="{score:.4f}">' in card
        assert f'title="{name} on the Steam store">{name}</a>' in card  # the whole name, even when cut
        assert f'href="https://store.steampowered.com/app/{apps[row]["appid"]}/"' in card


def test_strategies_in_plain_words(client, built_index):
    home = text_of(client.get("/"))
    for name in built_index.strategies:
        plain = parse_strategy(name).describe_plain()
        assert plain in home
        assert "[CLS]" not in plain and "eval_" not in plain
    page = text_of(client.get("/render/10?strategy=ComplexS16"))
    assert parse_strategy("ComplexS16").describe_plain() in page
    # The API keeps the technical line.
    api = client.get("/strategies").get_json()["strategies"]
    assert [s["description"] for s in api] == [parse_strategy(n).describe() for n in built_index.strategies]


def test_plain_descriptions_say_what_differs():
    assert parse_strategy("SimpleS16").describe_plain() == (
        "The model's overall impression of the picture. Small DINO model, 16-pixel squares, middle of the banner only."
    )
    assert "last 4 layers" in parse_strategy("ComplexS16").describe_plain()
    assert "average of every part" in parse_strategy("ComplexB16").describe_plain()
    assert "Medium DINO model" in parse_strategy("ComplexB16").describe_plain()
    assert "100%, 71%, 50%" in parse_strategy("MultiScaleS8").describe_plain()
    assert "whole banner" in parse_strategy("GemS16@full").describe_plain()
    assert "DINOv2" in parse_strategy("SimpleS14").describe_plain()


def test_unique_cards_name_their_best_match(client):
    unique = client.get("/unique?n=12").get_json()["games"]
    cards = text_of(client.get("/")).split('id="unique"')[1].split('class="card"')[1:]
    assert len(cards) == len(unique) == 12
    for card, game in zip(cards, unique, strict=True):
        best = game["best_match"]
        assert f'href="/render/{game["appid"]}"' in card
        assert f'Best match: <a class="name" href="/render/{best["appid"]}"' in card
        assert f">{best['name']}</a>" in card and f"{best['score'] * 100:.0f}% alike" in card


def test_compare_page_names_games_with_store_links(client, built_index):
    page = text_of(client.get("/compare/10?k=4", headers={"Accept": BROWSER_ACCEPT}))
    body = client.get("/compare/10?k=4").get_json()
    assert "Similarity: how alike" in page and "Steam store page" in page
    rows = page.split('class="compare-row"')[1:]
    assert len(rows) == 3
    for row, name in zip(rows, body["strategies"], strict=True):
        assert parse_strategy(name).describe_plain() in row
        for m in body["matches"][name]:
            assert (
                f'<a class="name" href="{m["store_url"]}" rel="noopener" title="{m["name"]} on the Steam store">' in row
            )
            assert f"#{m['rank']} · {m['score'] * 100:.0f}% alike" in row
    assert '<div class="table-scroll">' in page  # the overlap table scrolls inside itself on a phone
    cmp = client.get("/compare/10", headers={"Accept": BROWSER_ACCEPT})
    assert "script-src 'none'" in cmp.headers["Content-Security-Policy"]


@pytest.mark.parametrize(
    ("k", "max_k", "links"),
    [
        (20, 100, [("Show 20 more", 40), ("Show all 100", 100)]),
        (90, 100, [("Show 10 more", 100)]),
        (80, 100, [("Show 20 more", 100)]),
        (100, 100, []),
        (4, 10, [("Show 6 more", 10)]),
    ],
)
def test_more_links(k, max_k, links):
    assert more_links(k, max_k) == links


def test_show_more_goes_up_to_the_table(client):
    page = text_of(client.get("/render/40?strategy=SimpleS16&k=4"))
    assert page.count('class="card"') == 4
    more = re.findall(r'href="(/render/40\?[^"]*)">Show (\d+) more', page)
    assert more == [("/render/40?strategy=SimpleS16&k=10#m5", "6")]  # lands on the first new card
    longer = text_of(client.get(more[0][0].split("#")[0]))
    assert longer.count('class="card"') == 10 and 'id="m5"' in longer
    assert "Show" not in longer.split('id="matches"')[1]  # the table's 10 are all there: no more links


def test_random_game_redirects_to_an_indexed_gallery(client, built_index):
    appids = {a["appid"] for a in apps_of(built_index)}
    seen = set()
    for path in ["/random"] * 15 + ["/render/"]:
        r = client.get(path)
        assert r.status_code == 302 and r.headers["Cache-Control"] == "no-store"
        m = re.fullmatch(r"/render/(\d+)", r.headers["Location"])
        assert m and int(m[1]) in appids
        seen.add(int(m[1]))
    assert len(seen) > 1  # 16 draws from 24 games: all the same one would take odds of 24**-15
    kept = client.get("/random?strategy=simples16")
    assert re.fullmatch(r"/render/\d+\?strategy=SimpleS16", kept.headers["Location"])
    bad = client.get("/random?strategy=nope")
    assert bad.status_code == 400 and bad.mimetype == "text/html" and "unknown strategy" in text_of(bad)
    assert client.get("/render").status_code in (301, 308)  # werkzeug: to /render/
    assert 'href="/random"' in text_of(client.get("/"))  # the button, on every page's header
    assert 'href="/random?strategy=SimpleS16"' in text_of(client.get("/render/10?strategy=SimpleS16"))  # keeps it


def test_unknown_urls_answer_html_to_browsers_and_json_to_clients(client):
    page = client.get("/no/such/page", headers={"Accept": BROWSER_ACCEPT})
    assert page.status_code == 404 and page.mimetype == "text/html"
    text = text_of(page)
    assert "<h1>404: not found</h1>" in text and "there is no page at /no/such/page" in text
    assert "script-src 'none'" in page.headers["Content-Security-Policy"]
    wrong_method = client.post("/", headers={"Accept": BROWSER_ACCEPT})
    assert wrong_method.status_code == 405 and wrong_method.mimetype == "text/html"
    for accept in (None, "*/*", "application/json", "application/json, text/html"):
        api = client.get("/no/such/page", headers={"Accept": accept} if accept else {})
        assert api.status_code == 404 and api.is_json
        assert (
            api.get_json()["error"]["code"] == "not_found" and "no such endpoint" in api.get_json()["error"]["message"]
        )
    # Known API routes keep JSON errors even for a browser; pages keep HTML ones.
    assert client.get("/match/999999", headers={"Accept": BROWSER_ACCEPT}).is_json
    assert client.get("/banners/11.jpg", headers={"Accept": BROWSER_ACCEPT}).is_json
    assert client.get("/render/abc", headers={"Accept": "application/json"}).mimetype == "text/html"


def test_pages_under_a_public_url_with_a_path_keep_its_prefix(make_client):
    """Behind a proxy that serves the app at PUBLIC_URL's path (https://example.com/app/ -> /), every link,
    stylesheet, form and redirect of the pages must carry /app, as the banners' URLs do."""
    c = make_client(public_url="https://example.com/app/")
    for path in ["/", "/?q=portal", "/render/10?k=3", "/render/10?k=3&attention=1", "/pair/10/20", "/render/999"]:
        body = c.get(path, headers={"Accept": BROWSER_ACCEPT}).get_data(as_text=True)
        urls = re.findall(r'(?:href|src|action)="([^"]*)"', body)
        local = [u for u in urls if u.startswith("/")]
        assert local, path
        assert all(u.startswith("/app/") for u in local), (path, [u for u in local if not u.startswith("/app/")])
    cmp = c.get("/compare/10", headers={"Accept": BROWSER_ACCEPT}).get_data(as_text=True)
    assert 'href="/app/static/style.css"' in cmp and 'href="/app/render/10"' in cmp
    assert re.fullmatch(r"/app/render/\d+", c.get("/random").headers["Location"])
    assert c.get("/match/10?k=1").get_json()["query"]["banner_url"] == "https://example.com/app/banners/10.jpg"


def test_banners_from_public_url_are_allowed_by_the_pages_policy(make_client):
    """The pages' banners come from PUBLIC_URL: its origin must be in img-src, or a browser that opened the page
    at another name of the service (the platform's own hostname, an IP) shows no banner at all."""
    c = make_client(public_url="https://banners.example.com/")
    page = c.get("/render/10?k=3")
    assert 'src="https://banners.example.com/banners/10.jpg"' in page.get_data(as_text=True)
    img_src = next(d for d in page.headers["Content-Security-Policy"].split(";") if d.strip().startswith("img-src"))
    assert "https://banners.example.com" in img_src.split()


def test_no_attention_view_without_local_banners(make_client, tmp_path):
    """Attention overlays are drawn over the banner folder's files: without them the gallery must not offer a
    "What the model looks at" view that shows plain store banners under a legend about red parts."""
    (tmp_path / "empty").mkdir()
    c = make_client(banners_dir=tmp_path / "empty")
    page = text_of(c.get("/render/10?k=3"))
    assert "steamstatic.com" in page  # banners from the store
    assert "What the model looks at" not in page
    looks = text_of(c.get("/render/10?k=3&attention=1"))
    assert "Red: where the model's attention goes" not in looks and "What the model looks at" not in looks
    # with the banner folder the view is there
    assert "What the model looks at" in text_of(make_client().get("/render/10?k=3"))
