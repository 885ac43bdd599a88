"""The service behind the API and the pages: index, catalog, matcher and the payloads they share.

One instance per process, created by ``create_app`` and kept in
``app.extensions``. It knows nothing of HTTP: it takes plain values (an
appid, an upload's bytes, a base URL) and raises domain problems
(``app/problems.py``); the blueprints read requests and ``app/errors.py``
maps problems to status codes.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np

from core.dino.strategies import DEFAULT_STRATEGY
from core.dino.weights import ModelCache, WeightsUnavailable
from core.images import ImageRejected, open_image
from core.index import LoadedIndex
from core.steam import store_url

from .catalog import Catalog, Game
from .config import Settings
from .fallback import BannerFetcher, FetchFailed
from .matching import Matcher
from .problems import RateLimited, Unavailable, UpstreamFailed, unknown_app
from .ratelimit import RateLimiter
from .uploads import Upload, decode_upload

_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s/]+/)+(?=[^\s/])")  # an absolute path's folders (not a URL's)


def without_paths(text: str) -> str:
    """A message for clients: server paths shortened to their last part ("…/checkpoints/x.pth" stays useful)."""
    return _PATH.sub("…/", text)


ABSENT = "absent"  # cached fallback result: the CDN has no banner for this appid
log = logging.getLogger(__name__)


class Service:
    def __init__(self, settings: Settings, index: LoadedIndex) -> None:
        self.settings = settings
        self.index = index
        self.catalog = Catalog(index.apps, settings.banners_dir, settings.cdn_url)
        self.strategy_names = list(index.strategies)
        self._by_lower = {n.lower(): n for n in self.strategy_names}
        self.default_strategy = self._pick_default(settings.default_strategy)
        self.matcher = Matcher(
            index,
            allow_download=settings.allow_weights_download,
            retry_seconds=settings.weights_retry_seconds,
            torch_threads=settings.torch_threads,
            models=ModelCache(),  # one model per backbone for this app, shared by its strategies
        )
        self.preload = self._check_preload(settings.preload_models)
        self.limiter = RateLimiter(*settings.upload_rate_limit) if settings.upload_rate_limit else None
        self.fetcher = (
            BannerFetcher(
                settings.cdn_url,
                settings.fallback_timeout,
                int(settings.fallback_max_mb * 2**20),
                settings.fallback_cache_size,
                settings.fallback_negative_ttl,
            )
            if settings.fallback_fetch
            else None
        )

    def _pick_default(self, wanted: str | None) -> str:
        if wanted is not None:
            resolved = self.resolve_strategy(wanted)
            if resolved is None:
                raise ValueError(
                    f"DEFAULT_STRATEGY={wanted!r} is not in the index {self.index.path} "
                    f"(it has {', '.join(self.strategy_names)})"
                )
            return resolved
        return DEFAULT_STRATEGY if DEFAULT_STRATEGY in self.index.strategies else self.strategy_names[0]

    # -- strategies ----------------------------------------------------------------------------------
    def resolve_strategy(self, raw: str) -> str | None:
        """The index's strategy for a name, case-insensitively ("complexb16" is ComplexB16)."""
        if raw in self.index.strategies:
            return raw
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
            "default": name == self.default_strategy,
        }

    def _check_preload(self, wanted: list[str]) -> list[str]:
        """PRELOAD_MODELS resolved to the index's strategies; a name it lacks stops start-up (ValueError)."""
        if wanted == ["all"]:
            return list(self.strategy_names)
        resolved = [self.resolve_strategy(w) for w in wanted]
        unknown = [w for w, r in zip(wanted, resolved, strict=True) if r is None]
        if unknown:
            raise ValueError(
                f"PRELOAD_MODELS={','.join(wanted)!r}: {', '.join(unknown)} not in the index "
                f"(it has {', '.join(self.strategy_names)}; or 'all')"
            )
        return list(dict.fromkeys(resolved))

    def preload_models(self, wanted: list[str] | None = None) -> None:
        """Load the backbones (and searchers) of these strategies now rather than on the first upload."""
        for name in self._check_preload(wanted) if wanted is not None else self.preload:
            try:
                self.matcher.extractor(name)
                self.matcher.searcher(name)
            except WeightsUnavailable as e:  # weights may appear later; uploads answer 503 until then
                log.warning("PRELOAD_MODELS: %s: %s", name, e)

    # -- payloads ------------------------------------------------------------------------------------
    def matches(self, rows: np.ndarray, scores: np.ndarray, host_url: str) -> list[dict]:
        describe = self.catalog.describe_row
        return [
            {"rank": rank, **describe(row, host_url), "score": round(score, 6)}
            for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True), 1)
        ]

    def table_payload(self, strategy: str, game: Game, k: int, host_url: str) -> dict:
        rows, scores = self.matcher.table_matches(strategy, game.row, k)
        return {
            "strategy": strategy,
            "k": len(rows),
            "query": self.catalog.describe_row(game.row, host_url),
            "matches": self.matches(rows, scores, host_url),
        }

    def table_payload_json(self, strategy: str, game: Game, k: int, host_url: str) -> str:
        """table_payload() serialised, built from per-game JSON made at start: the lookup hot path.

        Equal to ``json.dumps(table_payload(...))`` (tests check it), at a fraction of the cost.
        """
        rows, scores = self.matcher.table_matches(strategy, game.row, k)
        host = json.dumps(host_url)[1:-1]
        row_json = self.catalog.describe_row_json
        matches = ",".join(
            f'{{"rank":{rank},{row_json(row, host)},"score":{round(score, 6)!r}}}'
            for rank, (row, score) in enumerate(zip(rows.tolist(), scores.tolist(), strict=True), 1)
        )
        return (
            f'{{"strategy":{json.dumps(strategy)},"k":{len(rows)},"query":{{{row_json(game.row, host)}}},'
            f'"matches":[{matches}]}}'
        )

    def check_rate_limit(self, client: str) -> None:
        if self.limiter is None:
            return
        wait = self.limiter.hit(client)
        if wait is not None:
            raise RateLimited(
                "rate_limited", f"too many uploads; try again in {wait:.1f} s", retry_after=max(1, int(wait + 0.999))
            )

    def embed_or_503(self, strategy: str, image) -> tuple[np.ndarray, dict[str, float]]:
        """The embedding; a 503 without server paths when the weights are missing (the log has them in full)."""
        try:
            return self.matcher.embed(strategy, image)
        except WeightsUnavailable as e:
            log.warning("image search unavailable for %s: %s", strategy, e)
            raise Unavailable(
                "weights_unavailable", f"image search is unavailable for {strategy}: {without_paths(str(e))}"
            ) from None
        except (OverflowError, MemoryError) as e:  # core.images bounds sizes first: a last line of defence
            raise ImageRejected("too_large_after_resize", f"the image is too large to preprocess ({e})") from None

    def _resize_to(self, strategy: str):
        """How the strategy's preprocessing resizes an image (core.images bounds the result before decoding)."""
        return self.index.strategies[strategy].strategy.preprocessing.pil_resized_size

    def upload_payload(
        self, data: bytes, strategy: str, k: int, host_url: str
    ) -> tuple[dict, dict[str, float], Upload]:
        """Matches for an uploaded image's bytes, decoded with the configured limits."""
        upload = decode_upload(data, self.settings.max_image_pixels, self._resize_to(strategy))
        vec, timings = self.embed_or_503(strategy, upload.image)
        found = self.matcher.search(strategy, vec, k)
        timings = {"decode": upload.decode_ms, **timings, **found.timings_ms}
        payload = {
            "strategy": strategy,
            "k": len(found.rows),
            "query": upload.describe(),
            "matches": self.matches(found.rows, found.scores, host_url),
        }
        return payload, timings, upload

    def unique_payload(self, strategy: str, n: int, host_url: str) -> list[dict]:
        s = self.index.strategies[strategy]
        out = []
        for row in self.matcher.unique(strategy, n):
            entry = self.catalog.describe_row(row, host_url)
            if s.k:
                best = self.catalog.games[int(s.neighbours[row, 0])]
                entry["best_match"] = {
                    "appid": best.appid,
                    "name": best.name,
                    "score": round(float(s.scores[row, 0]), 6),
                }
            out.append(entry)
        return out

    def compare_payload(self, names: list[str], game: Game, k: int, host_url: str) -> dict:
        results = {}
        sets = {}
        for name in names:
            kk = min(k, self.max_k(name))
            rows, scores = self.matcher.table_matches(name, game.row, kk)
            results[name] = self.matches(rows, scores, host_url)
            sets[name] = {self.catalog.games[r].appid for r in rows.tolist()}
        overlap = {
            a: {b: round(len(sets[a] & sets[b]) / max(1, min(len(sets[a]), len(sets[b]))), 4) for b in names}
            for a in names
        }
        common = set.intersection(*sets.values()) if sets else set()
        return {
            "query": self.catalog.describe_row(game.row, host_url),
            "k": k,
            "strategies": names,
            "matches": results,
            "overlap": overlap,
            "in_all": sorted(common),
        }

    # -- unknown appids: optional CDN fallback -------------------------------------------------------
    def fallback_match(self, appid: int, strategy: str, k: int, host_url: str, client: str = "-") -> dict:
        """Matches for a game that is not in the index, from its banner on the CDN (when FALLBACK_FETCH is on).

        A cache miss costs a model pass, so it counts against the upload rate limit like an upload.
        """
        if self.fetcher is None:
            raise unknown_app(appid)
        key = (appid, strategy)
        cached = self.fetcher.cached(key)
        if cached is None:
            self.check_rate_limit(client)
            cached = self.fetcher.flights.run(key, lambda: self._fetch_and_embed(appid, strategy))
        if isinstance(cached, UpstreamFailed):  # a fresh exception: the cached one is shared between threads
            raise UpstreamFailed(cached.code, cached.message)
        if cached is ABSENT:
            raise unknown_app(appid, "is not in the index and Steam has no banner for it")
        found = self.matcher.search(strategy, cached, k)
        return {
            "strategy": strategy,
            "k": len(found.rows),
            "query": {
                "appid": appid,
                "name": "",
                "store_url": store_url(appid),
                "banner_url": self.fetcher.url(appid),
                "source": "steam_cdn",
            },
            "matches": self.matches(found.rows, found.scores, host_url),
        }

    def _fetch_and_embed(self, appid: int, strategy: str):
        """The embedding, ABSENT, or an UpstreamFailed; each remembered (failures for FALLBACK_NEGATIVE_TTL)."""
        key = (appid, strategy)
        try:
            data = self.fetcher.fetch(appid)
            if data is None:
                self.fetcher.remember(key, ABSENT)
                return ABSENT
            image = open_image(data, max_pixels=self.settings.max_image_pixels, resize_to=self._resize_to(strategy))
        except FetchFailed as e:
            failed = UpstreamFailed("fallback_failed", f"appid {appid} is not in the index and {e}")
            self.fetcher.remember(key, failed, ttl_s=self.settings.fallback_negative_ttl)
            return failed
        except ImageRejected as e:
            failed = UpstreamFailed("fallback_failed", f"the CDN's banner for {appid} is not usable: {e.message}")
            self.fetcher.remember(key, failed, ttl_s=self.settings.fallback_negative_ttl)
            return failed
        vec, _ = self.embed_or_503(strategy, image)
        self.fetcher.remember(key, vec)
        return vec
