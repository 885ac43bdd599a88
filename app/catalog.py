"""The games of the index: lookup by appid, links, and name search.

Name search ignores case and accents ("pokemon" finds "Pokémon") and ranks exact names, then prefixes, word
prefixes, substrings, and names holding every word; shorter names first within a rank. An all-digit query also
finds that appid. The folded names are one UTF-8 text in a numpy array, made before gunicorn forks so that the
workers share it; a search is a few vectorised passes over it.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.apps import AppColumns
from core.banners import find_banner_file, scan_banners
from core.steam import banner_asset_url, is_ascii_digits, store_url

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

    def __init__(self, apps: AppColumns, banners_dir: Path | None, assets_url: str) -> None:
        self.apps, self.banners_dir, self.assets_url = apps, banners_dir, assets_url
        folded = [fold(n) for n in apps.names.tolist()]
        # "\n" then each folded name and "\n" (no name holds one); row i spans _starts[i] to _starts[i + 1] - 1
        self._text = np.frombuffer(("\n" + "".join(f"{f}\n" for f in folded)).encode(), dtype=np.uint8)
        self._starts = np.flatnonzero(self._text == ord("\n")) + 1
        self._chars = np.array([len(f) for f in folded], dtype=np.int32)  # the ranking's name lengths
        self.local = np.array(sorted(scan_banners(banners_dir) if banners_dir else ()), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.apps)

    def game(self, row: int) -> Game:
        return Game(row, int(self.apps.appids[row]), str(self.apps.names[row]))

    def get(self, appid: int) -> Game | None:
        row = self.apps.row(appid)
        return None if row is None else self.game(row)

    def has_local_banner(self, appid: int) -> bool:
        i = int(np.searchsorted(self.local, appid))
        return i < len(self.local) and int(self.local[i]) == appid

    def banner_file(self, appid: int) -> Path | None:
        """The game's banner in the banner folder, if it has one."""
        return find_banner_file(self.banners_dir, appid) if self.has_local_banner(appid) else None

    def banner_url(self, row: int, host_url: str) -> str:
        """Our own copy when the banner folder has it (same origin), else the store's URL of the banner (under a
        content hash when the art was re-uploaded). A game the store gave no path for has the plain path: the index
        only holds games whose banner was downloaded, and the downloader takes that path exactly for them."""
        appid = int(self.apps.appids[row])
        if self.has_local_banner(appid):
            return f"{host_url}banners/{appid}.jpg"
        return banner_asset_url(appid, str(self.apps.banners[row]), self.assets_url)

    def describe_row(self, row: int, host_url: str) -> dict:
        """A game for responses: appid, name, store page and banner."""
        g, banner = self.game(row), self.banner_url(row, host_url)
        return {"appid": g.appid, "name": g.name, "store_url": store_url(g.appid), "banner_url": banner}

    def _at(self, pattern: bytes) -> np.ndarray:
        """Offsets in the text where ``pattern`` (a folded word or phrase: no "\n") starts."""
        text = self._text
        at = np.flatnonzero(text[: max(0, len(text) - len(pattern) + 1)] == pattern[0])
        for j in range(1, len(pattern)):
            at = at[text[at + j] == pattern[j]]
        return at

    def _rows(self, at: np.ndarray) -> np.ndarray:
        """Which rows hold these offsets, as a mask over the rows."""
        mask = np.zeros(len(self), dtype=bool)
        mask[np.searchsorted(self._starts, at, side="right") - 1] = True
        return mask

    def search(self, query: str, limit: int) -> list[Game]:
        q = fold(query)
        if not q:
            return []
        terms = q.split()
        first = self._at(terms[0].encode())
        every = self._rows(first)
        for term in terms[1:]:
            every &= self._rows(self._at(term.encode()))
        at = first if len(terms) == 1 else self._at(q.encode())
        rows = np.flatnonzero(every)
        whole, prefix = self._rows(at)[rows], self._rows(at[self._text[at - 1] == ord("\n")])[rows]
        word = self._rows(first[np.isin(self._text[first - 1], (ord(" "), ord("\n")))])[rows]
        exact = prefix & (self._starts[rows + 1] - self._starts[rows] - 1 == len(q.encode()))
        rank = np.select([exact, prefix, word & whole, whole], [0, 1, 2, 3], 4)
        order = np.lexsort((self.apps.appids[rows], self._chars[rows], rank))
        found = [self.game(int(r)) for r in rows[order[:limit]]]
        exact_appid = self.get(int(query.strip())) if is_ascii_digits(query.strip()) else None
        if exact_appid is not None:
            found = [exact_appid, *(g for g in found if g.row != exact_appid.row)][:limit]
        return found
