"""The service's catalog: compact columns, lookups by appid, and name search ranked as documented.

Search is checked against a plain transcription of its rules (one Python loop over the names) on the real 2021
Steam catalog when ../shared has it, else on synthetic games of its size (accents, ™, CJK and punctuation among
their names).
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.catalog import Catalog, fold
from core.apps import AppColumns
from devtools.synthetic import load_catalog


def reference_search(folded: list[str], appids: list[int], query: str, limit: int) -> list[int]:
    """The rows the rules give: exact name, prefix, a word's prefix, substring, every word; shorter names, then
    lower appids, first; an all-digit query's appid before all."""
    q = fold(query)
    if not q:
        return []
    terms = q.split()
    ranked = []
    for row, name in enumerate(folded):
        if not all(t in name for t in terms):
            continue
        word = any(w.startswith(terms[0]) for w in name.split())
        rank = 0 if name == q else 1 if name.startswith(q) else 2 if word and q in name else 3 if q in name else 4
        ranked.append((rank, len(name), appids[row], row))
    rows = [r[3] for r in sorted(ranked)]
    if query.strip().isascii() and query.strip().isdigit() and int(query.strip()) in appids:
        exact = appids.index(int(query.strip()))
        rows = [exact, *(r for r in rows if r != exact)]
    return rows[:limit]


@pytest.fixture(scope="module")
def catalog():
    apps, _ = load_catalog()
    return apps, Catalog(AppColumns(apps), None, "https://assets.example/")


def queries(apps: list[dict], n: int) -> list[str]:
    """Words, word pairs, prefixes and middles of real names, appids, accented and odd spellings, and misses."""
    rng = random.Random(1)
    names = [a["name"] for a in rng.sample(apps, n)]
    out = [w for name in names[:10] for w in name.split()[:1]]
    out += [" ".join(name.split()[:2]) for name in names[10:20]]
    out += [name[:3] for name in names[20:30]] + [name[2:6] for name in names[30:40]] + names[40:45]
    out += [str(apps[7]["appid"]), "10", "2", "POKÉMON", "pokemon", "cafe", "star wars", "ōkami", "straße", "™"]
    return [*out, "the", "a", "e", "2 ii", "of the", "  portal  ", "!!!", "zzzqx", "恋愛", "half life"]


@pytest.mark.slow  # the reference is a Python loop over every name for each of some sixty queries
def test_search_follows_the_rules_on_a_whole_catalog(catalog):
    apps, cat = catalog
    folded, appids = [fold(a["name"]) for a in apps], [a["appid"] for a in apps]
    for q in queries(apps, 45):
        for limit in (1, 20):
            assert [g.row for g in cat.search(q, limit)] == reference_search(folded, appids, q, limit), (q, limit)


def test_columns_read_as_the_app_list(catalog):
    apps, cat = catalog
    assert len(cat) == len(apps) and cat.apps.names.dtype == np.dtypes.StringDType()
    for row in (0, 1, len(apps) // 2, len(apps) - 1):
        assert cat.apps[row] == apps[row] and cat.apps.row(apps[row]["appid"]) == row
        game = cat.get(apps[row]["appid"])
        assert (game.row, game.appid, game.name) == (row, apps[row]["appid"], apps[row]["name"])
    assert cat.get(apps[-1]["appid"] + 1) is None and cat.get(1) is None
    described = cat.describe_row(3, "/")
    assert described["banner_url"] == f"https://assets.example/{apps[3]['banner']}"
    assert described["store_url"] == f"https://store.steampowered.com/app/{apps[3]['appid']}/"


def test_rows_need_not_be_sorted_by_appid():
    apps = [{"appid": 30, "name": "Thirty"}, {"appid": 10, "name": "Ten", "banner": "x/10.jpg"}, {"appid": 20}]
    cols = AppColumns([{"name": "", **a} for a in apps])
    assert [cols.row(a) for a in (10, 20, 30, 40, 5)] == [1, 2, 0, None, None]
    assert list(cols) == [{"appid": 30, "name": "Thirty"}, {"appid": 10, "name": "Ten", "banner": "x/10.jpg"},
                          {"appid": 20, "name": ""}]  # fmt: skip
    assert Catalog(AppColumns([]), None, "https://a.example/").search("ten", 5) == []
