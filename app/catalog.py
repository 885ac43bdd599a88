"""The games of the index: lookup by appid, links, and name search.

Name search is case- and accent-insensitive ("pokemon" finds "Pokémon", "STAR WARS" finds "Star Wars™") and ranked:
exact name, then names starting with the query, then names with a word starting with it, then names containing it,
then names containing every word of it; shorter names first within a rank. An all-digit query also finds the game
with that appid.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from core.banners import scan_banners
from core.steam import banner_url as cdn_banner_url
from core.steam import is_ascii_digits, store_url

_NON_WORD = re.compile(r"[^\w]+", re.UNICODE)


def fold(text: str) -> str:
    """Lower-case, accent-free, punctuation-free text with single spaces."""
    if not text.isascii():  # ASCII (most names) has nothing to decompose
        decomposed = unicodedata.normalize("NFKD", text)
        text = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_NON_WORD.sub(" ", text.casefold()).split())


@dataclass(frozen=True)
class Game:
    row: int
    appid: int
    name: str


class Catalog:
    """The index's apps, in row order, with what the API needs to describe each one."""

    def __init__(self, apps: list[dict], banners_dir: Path | None, cdn_url: str) -> None:
        self.games = [Game(i, int(a["appid"]), a["name"]) for i, a in enumerate(apps)]
        self.by_appid = {g.appid: g for g in self.games}
        self._names: tuple[list[str], list[list[str]]] | None = None  # folded names and their words: names()
        self.cdn_url = cdn_url
        self.banners_dir = banners_dir
        self.local_banners = set(scan_banners(banners_dir)) if banners_dir else set()

    def __len__(self) -> int:
        return len(self.games)

    def names(self) -> tuple[list[str], list[list[str]]]:
        """Every name folded for search, and its words: made on the first search, not at every start-up (two
        threads racing make the same lists)."""
        if self._names is None:
            folded = [fold(g.name) for g in self.games]
            self._names = folded, [f.split() for f in folded]
        return self._names

    def get(self, appid: int) -> Game | None:
        return self.by_appid.get(appid)

    def describe_row(self, row: int, host_url: str) -> dict:
        """A game for responses: appid, name, store page, and its banner: our own copy when the banner folder
        has it (same origin), else the Steam CDN's."""
        g = self.games[row]
        local = g.appid in self.local_banners
        banner = f"{host_url}banners/{g.appid}.jpg" if local else cdn_banner_url(g.appid, self.cdn_url)
        return {"appid": g.appid, "name": g.name, "store_url": store_url(g.appid), "banner_url": banner}

    def search(self, query: str, limit: int) -> list[Game]:
        q = fold(query)
        if not q:
            return []
        terms = q.split()
        ranked: list[tuple[int, int, int, Game]] = []
        folded, words_of = self.names()
        for game, name, words in zip(self.games, folded, words_of, strict=True):
            if q not in name and not all(t in name for t in terms):
                continue
            if name == q:
                rank = 0
            elif name.startswith(q):
                rank = 1
            elif any(w.startswith(terms[0]) for w in words) and q in name:
                rank = 2
            elif q in name:
                rank = 3
            else:
                rank = 4
            ranked.append((rank, len(name), game.appid, game))
        if is_ascii_digits(query.strip()):
            exact = self.by_appid.get(int(query.strip()))
            if exact is not None:
                ranked.append((-1, 0, exact.appid, exact))
        ranked.sort(key=lambda r: r[:3])
        out, seen = [], set()
        for *_, game in ranked:
            if game.appid not in seen:
                seen.add(game.appid)
                out.append(game)
                if len(out) == limit:
                    break
        return out
