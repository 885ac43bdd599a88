"""The service behind the API and the pages: index, catalog, matcher and the payloads they share.

One instance per process, created by ``create_app`` and kept in ``app.extensions``. It knows nothing of HTTP: it
takes plain values (an appid, an upload's bytes, a base URL) and raises domain problems (``app/problems.py``); the
blueprints read requests and ``app/errors.py`` maps problems to status codes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from core.dino.strategies import DEFAULT_STRATEGY
from core.dino.weights import WeightsUnavailable
from core.images import ImageRejected, open_image
from core.index import LoadedIndex
from core.overlay import overlay, png_bytes, side_by_side
from core.steam import store_url
from core.variants import apply_variant

from . import metrics
from .catalog import Catalog, Game
from .config import Settings
from .fallback import CdnFallback
from .http_cache import HttpCache, build_id
from .matching import Matcher
from .problems import Forbidden, NotFound, Unavailable, unknown_app, variant_unavailable
from .uploads import Upload, decode_upload
from .urlfetch import UrlFetcher, public_only

_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s/]+/)+(?=[^\s/])")  # an absolute path's folders (not a URL's)


def without_paths(text: str) -> str:
    """A message for clients: server paths shortened to their last part ("…/checkpoints/x.pth" stays useful)."""
    return _PATH.sub("…/", text)


log = logging.getLogger(__name__)
T = TypeVar("T")
PAIRS_REMEMBERED = 256  # per worker: a pair seen again (its page, then its picture) skips two forward passes


def map_json(heat: np.ndarray) -> dict:
    """A (h, w) map for JSON answers."""
    return {"grid": list(heat.shape), "map": np.round(np.asarray(heat, np.float64), 6).tolist()}


class Service:
    def __init__(self, settings: Settings, index: LoadedIndex) -> None:
        self.settings = settings
        self.index = index
        self.catalog = Catalog(index.apps, settings.banners_dir, settings.assets_url)
        self.strategy_names = list(index.strategies)
        self._by_lower = {n.lower(): n for n in self.strategy_names}
        if settings.default_strategy is not None:
            self.default_strategy = self._named("DEFAULT_STRATEGY", [settings.default_strategy])[0]
        else:
            self.default_strategy = DEFAULT_STRATEGY if DEFAULT_STRATEGY in index.strategies else self.strategy_names[0]
        self.matcher = Matcher(index, settings)
        self.build_id = build_id(index)
        # answers also depend on the default strategy (/strategies) and on where banner_url points (the banner
        # folder's files, the store's base URL)
        served = hashlib.sha256(f"{self.default_strategy}|{settings.assets_url}|".encode())
        served.update(self.catalog.local.tobytes())
        self.http_cache = HttpCache(self.build_id, settings.cache_max_age, served.hexdigest())
        if settings.preload_models == ["all"]:
            self.preload = list(self.strategy_names)
        else:
            self.preload = self._named("PRELOAD_MODELS", settings.preload_models, "; or 'all'")
        self.url_fetcher, self.fetcher = None, None  # POST /match {"url": ...}, and the CDN fallback: opt-in
        if settings.url_fetch:
            networks = public_only(settings.url_fetch_allow_networks)
            self.url_fetcher = UrlFetcher(settings.url_fetch_timeout, int(settings.url_fetch_max_mb * 2**20), networks)
        if settings.fallback_fetch:
            self.fetcher = CdnFallback(settings, lambda s, image: self.embed_or_503(s, image)[0])
        self.patch_maps = functools.lru_cache(maxsize=PAIRS_REMEMBERED)(self._patch_maps)

    def _named(self, setting: str, wanted: list[str], also: str = "") -> list[str]:
        """A setting's strategies resolved to the index's; a name it lacks stops start-up (``also``: what else the
        setting takes, for the message)."""
        resolved = [self.resolve_strategy(w) for w in wanted]
        unknown = [w for w, r in zip(wanted, resolved, strict=True) if r is None]
        if unknown:
            raise ValueError(
                f"{setting}={','.join(wanted)!r}: {', '.join(unknown)} not in the index {self.index.path} "
                f"(it has {', '.join(self.strategy_names)}{also})"
            )
        return list(dict.fromkeys(resolved))

    def resolve_strategy(self, raw: str) -> str | None:
        """The index's strategy for a name, case-insensitively ("complexb16" is ComplexB16)."""
        return self._by_lower.get(raw.lower())

    def game(self, appid: int) -> Game:
        """The indexed game of an appid; NotFound otherwise."""
        game = self.catalog.get(appid)
        if game is None:
            raise unknown_app(appid)
        return game

    def max_k(self, strategy: str) -> int:
        k = self.index.strategies[strategy].k
        return min(k, self.settings.max_k) if self.settings.max_k else k

    def describe_strategy(self, name: str) -> dict:
        s = self.index.strategies[name]
        return {
            "name": name,
            "description": s.strategy.describe(),
            "style": s.strategy.style.name,
            "backbone": s.strategy.backbone.label,
            "dim": s.strategy.dim,
            "k": s.k,
            "preprocessing": s.strategy.preprocessing.name,
            "params": s.strategy.params,
            "checkpoint": s.checkpoint.get("file"),
            "variants": sorted(s.variants),
            "default": name == self.default_strategy,
        }

    def preload_models(self) -> None:
        """Load the backbones (and searchers) of PRELOAD_MODELS now rather than on the first upload."""
        for name in self.preload:
            try:
                self.matcher.extractor(name)
                self.matcher.searcher(name)
            except WeightsUnavailable as e:  # weights may appear later; uploads answer 503 until then
                log.warning("PRELOAD_MODELS: %s: %s", name, e)

    # -- payloads ------------------------------------------------------------------------------------
    def matches(self, rows: np.ndarray, scores: np.ndarray, host_url: str, first_rank: int = 1) -> list[dict]:
        describe = self.catalog.describe_row
        return [
            {"rank": rank, **describe(row, host_url), "score": round(score, 6)}
            for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True), first_rank)
        ]

    def match_payload(
        self, strategy: str, query: dict, rows: np.ndarray, scores: np.ndarray, host_url: str, offset: int, variant: str
    ) -> dict:
        """The one shape of every match answer: a game's lookup, an upload's, a batch's parts, the fallback's."""
        return {
            "strategy": strategy,
            "k": len(rows),
            "offset": offset,
            **({"variant": variant} if variant else {}),
            "query": query,
            "matches": self.matches(rows, scores, host_url, offset + 1),
        }

    def check_variant(self, strategy: str, variant: str) -> None:
        """A mirror/flip lookup needs its precomputed tables: a 400 naming the build option otherwise."""
        if variant and variant not in self.index.strategies[strategy].variants:
            raise variant_unavailable(variant, strategy, sorted(self.index.strategies[strategy].variants))

    def table_payload(
        self, strategy: str, game: Game, k: int, host_url: str, offset: int = 0, variant: str = ""
    ) -> dict:
        rows, scores = self.matcher.table_matches(strategy, game.row, k, offset, variant)
        query = self.catalog.describe_row(game.row, host_url)
        return self.match_payload(strategy, query, rows, scores, host_url, offset, variant)

    def batch_payload(
        self, strategy: str, appids: list[int], k: int, host_url: str, offset: int = 0, variant: str = ""
    ) -> dict:
        """Lookups of many appids in one answer: each one's match payload, or its error, in the order asked."""
        results = []
        for appid in appids:
            game = self.catalog.get(appid)
            if game is None:
                problem = unknown_app(appid)
                results.append({"appid": appid, "error": {"code": problem.code, "message": problem.message}})
            else:
                results.append(self.table_payload(strategy, game, k, host_url, offset, variant))
        return {"strategy": strategy, "k": k, "offset": offset, "variant": variant, "results": results}

    def embed_or_503(self, strategy: str, image) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """The embedding and attention map (``Matcher.embed``), or the problems of ``model_pass``."""
        return self.model_pass(strategy, lambda: self.matcher.embed(strategy, image))

    def model_pass(self, strategy: str, work: Callable[[], T]) -> T:
        """``work()``; a 503 without server paths when the weights are missing (the log has them in full)."""
        try:
            return work()
        except WeightsUnavailable as e:
            log.warning("the model is unavailable for %s: %s", strategy, e)
            raise Unavailable(
                "weights_unavailable", f"the model is unavailable for {strategy}: {without_paths(str(e))}"
            ) from None
        except (OverflowError, MemoryError) as e:  # core.images bounds sizes first: a last line of defence
            raise ImageRejected("too_large_after_resize", f"the image is too large to preprocess ({e})") from None

    def _resize_to(self, strategy: str):
        """How the strategy's preprocessing resizes an image (core.images bounds the result before decoding)."""
        return self.index.strategies[strategy].strategy.preprocessing.pil_resized_size

    def upload_payload(
        self,
        data: bytes,
        strategy: str,
        k: int,
        host_url: str,
        *,
        offset: int = 0,
        variant: str = "",
        embedding: bool = False,
        attention: bool = False,
    ) -> tuple[dict, dict[str, float], Upload]:
        """Matches for an uploaded image's bytes, decoded with the configured limits (mirrored/flipped first)."""
        upload = decode_upload(data, self.settings, self._resize_to(strategy))
        vec, heat, timings = self.embed_or_503(strategy, apply_variant(upload.image, variant))
        rows, scores, search_ms = self.matcher.search(strategy, vec, offset + k)
        timings = {"decode": upload.decode_ms, **timings, **search_ms}
        payload = self.match_payload(strategy, upload.query, rows[offset:], scores[offset:], host_url, offset, variant)
        if embedding:
            payload["embedding"] = np.asarray(vec, dtype=np.float32).tolist()
        if attention:
            payload["attention"] = map_json(heat)
        metrics.upload_timed(strategy, timings)
        return payload, timings, upload

    def fetch_url(self, url: str) -> bytes:
        """The image at a client's URL (POST /match {"url": ...}), when URL_FETCH is on."""
        if self.url_fetcher is None:
            raise Forbidden("url_fetch_disabled", "queries by URL are switched off here (URL_FETCH=1 enables them)")
        return self.url_fetcher.fetch(url)

    def search_payload(self, query: str, limit: int, host_url: str) -> list[dict]:
        """The games whose name matches a query, best first (``Catalog.search``)."""
        return [self.catalog.describe_row(g.row, host_url) for g in self.catalog.search(query, limit)]

    def unique_payload(self, strategy: str, n: int, host_url: str, offset: int = 0) -> dict:
        """The games whose best match is least similar, each with that match."""
        games = []
        for row in self.matcher.unique(strategy, offset + n)[offset:]:
            entry = self.catalog.describe_row(row, host_url)
            rows, scores = self.matcher.table_matches(strategy, row, 1)
            if len(rows):
                best = self.catalog.game(int(rows[0]))
                entry["best_match"] = {"appid": best.appid, "name": best.name, "score": round(float(scores[0]), 6)}
            games.append(entry)
        return {"strategy": strategy, "n": len(games), "offset": offset, "games": games}

    def compare_payload(self, names: list[str], game: Game, k: int, host_url: str) -> dict:
        results, sets = {}, {}
        for name in names:
            rows, scores = self.matcher.table_matches(name, game.row, min(k, self.max_k(name)))
            results[name] = self.matches(rows, scores, host_url)
            sets[name] = set(self.catalog.apps.appids[rows].tolist())
        overlap = {
            a: {b: round(len(sets[a] & sets[b]) / max(1, min(len(sets[a]), len(sets[b]))), 4) for b in names}
            for a in names
        }
        return {
            "query": self.catalog.describe_row(game.row, host_url),
            "k": k,
            "strategies": names,
            "matches": results,
            "overlap": overlap,
            "in_all": sorted(set.intersection(*sets.values()) if sets else set()),
        }

    # -- what the model looks at, and which parts of two banners match -------------------------------
    def attention_map(self, strategy: str, game: Game) -> np.ndarray:
        """The game's (h, w) attention map from the index; NotFound for an index built without them."""
        if self.index.strategies[strategy].attention is None:
            why = f"this index has no attention maps for {strategy}: rebuild it with this version's build_index.py"
            raise NotFound("attention_unavailable", why)
        return self.matcher.reader(strategy, "attention").rows(np.array([game.row]))[0].astype(np.float32)

    def attention_payload(self, strategy: str, game: Game) -> dict:
        return {"appid": game.appid, "strategy": strategy, **map_json(self.attention_map(strategy, game))}

    def banner_file(self, game: Game) -> Path:
        """The game's banner in the banner folder; NotFound without one."""
        path = self.catalog.banner_file(game.appid)
        if path is None:
            raise NotFound("no_banner", f"appid {game.appid} has no banner in this service's banner folder")
        return path

    def banner(self, strategy: str, game: Game) -> Image.Image:
        """The game's banner, decoded as the builder does."""
        return open_image(self.banner_file(game), resize_to=self._resize_to(strategy))

    def overlay_png(self, strategy: str, pairs: list[tuple[Game, np.ndarray]]) -> bytes:
        """Each game's banner with its map drawn where the strategy's preprocessing looks, side by side."""
        prep = self.index.strategies[strategy].strategy.preprocessing
        images = [self.banner(strategy, game) for game, _ in pairs]
        drawn = [overlay(im, heat, prep.seen_box(*im.size)) for im, (_, heat) in zip(images, pairs, strict=True)]
        return png_bytes(functools.reduce(side_by_side, drawn))

    def _patch_maps(self, strategy: str, a: Game, b: Game) -> tuple[np.ndarray, np.ndarray]:
        """Each banner's patches scored by their best cosine to the other's (two forward passes)."""
        images = self.banner(strategy, a), self.banner(strategy, b)
        return self.model_pass(strategy, lambda: self.matcher.patch_matches(strategy, *images))

    def pair_score(self, strategy: str, a: Game, b: Game) -> tuple[float, str]:
        """The pair's cosine, from a's table when b is in it, else of their stored embeddings."""
        s = self.index.strategies[strategy]
        rows, scores = self.matcher.table_matches(strategy, a.row, s.k)
        hit = np.flatnonzero(rows == b.row)
        if len(hit):
            return round(float(scores[hit[0]]), 6), "table"
        ea, eb = self.matcher.reader(strategy, "embeddings").rows(np.array([a.row, b.row])).astype(np.float32)
        return round(float(ea @ eb), 6), "embeddings"

    def why_payload(self, strategy: str, a: Game, b: Game, host_url: str) -> dict:
        (map_a, map_b), (score, source) = self.patch_maps(strategy, a, b), self.pair_score(strategy, a, b)
        describe = self.catalog.describe_row
        a_side, b_side = describe(a.row, host_url) | map_json(map_a), describe(b.row, host_url) | map_json(map_b)
        return {"strategy": strategy, "score": score, "score_from": source, "a": a_side, "b": b_side}

    def why_png(self, strategy: str, a: Game, b: Game) -> bytes:
        map_a, map_b = self.patch_maps(strategy, a, b)
        return self.overlay_png(strategy, [(a, map_a), (b, map_b)])

    # -- unknown appids: the optional CDN fallback (app/fallback.py) ---------------------------------
    def fallback_match(
        self, appid: int, strategy: str, k: int, host_url: str, offset: int = 0, variant: str = ""
    ) -> dict:
        """Matches for a game that is not in the index, from its store banner (when FALLBACK_FETCH is on)."""
        if self.fetcher is None:
            raise unknown_app(appid)
        vec, banner_url = self.fetcher.embedding(appid, strategy, variant, self._resize_to(strategy))
        rows, scores, _ = self.matcher.search(strategy, vec, offset + k)
        query = {
            "appid": appid,
            "name": "",
            "store_url": store_url(appid),
            "banner_url": banner_url,
            "source": "steam_cdn",
        }
        return self.match_payload(strategy, query, rows[offset:], scores[offset:], host_url, offset, variant)
