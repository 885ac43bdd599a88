"""The service object behind the API and the pages: index, catalog, matcher and the payloads they share.

One instance per process, created by ``create_app`` and kept in
``app.extensions``; the HTTP layers only parse parameters and render.
"""

from __future__ import annotations

import json
import logging

import numpy as np
from flask import current_app

from core.dino.strategies import DEFAULT_STRATEGY
from core.dino.weights import ModelCache, WeightsUnavailable
from core.images import ImageRejected, open_image
from core.index import LoadedIndex
from core.steam import store_url

from .catalog import Catalog, Game
from .config import Settings
from .errors import APIError
from .fallback import BannerFetcher, FetchFailed
from .matching import Matcher
from .ratelimit import RateLimiter
from .uploads import Upload, buffer_body, decode_upload, read_upload_bytes

EXTENSION_KEY = "steam_dino"
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
            concurrent_forwards=settings.concurrent_forwards,
            models=ModelCache(),  # one model per backbone for this app, shared by its strategies
        )
        self.limiter = RateLimiter(*settings.upload_rate_limit) if settings.upload_rate_limit else None
        self.fetcher = (
            BannerFetcher(
                settings.cdn_url,
                settings.fallback_timeout,
                int(settings.fallback_max_mb * 2**20),
                settings.fallback_cache_size,
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

    def unknown_strategy(self, raw: str, parameter: str) -> APIError:
        """The 400 for a strategy this index does not have, listing the ones it has."""
        return APIError(
            400,
            "unknown_strategy",
            f"unknown strategy {raw[:60]!r}; available: {', '.join(self.strategy_names)}",
            parameter=parameter,
            available=self.strategy_names,
        )

    def strategies_param(self, raw: str | None) -> list[str]:
        if raw is None or not raw.strip():
            return list(self.strategy_names)
        names = []
        for part in raw.split(","):
            if not part.strip():
                continue
            resolved = self.resolve_strategy(part.strip())
            if resolved is None:
                raise self.unknown_strategy(part.strip(), "strategies")
            if resolved not in names:
                names.append(resolved)
        if not names:
            raise APIError(400, "bad_parameter", "strategies: give at least one name", parameter="strategies")
        return names

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

    def preload_models(self, wanted: list[str]) -> None:
        """Load the backbones (and searchers) of these strategies now rather than on the first upload."""
        names = self.strategy_names if wanted == ["all"] else [self.resolve_strategy(w) or w for w in wanted]
        for name in names:
            if name not in self.index.strategies:
                log.warning("PRELOAD_MODELS: %s is not in the index; ignored", name)
                continue
            try:
                self.matcher.extractor(name)
                self.matcher.searcher(name)
            except WeightsUnavailable as e:
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
            err = APIError(429, "rate_limited", f"too many uploads; try again in {wait:.1f} s")
            err.headers["Retry-After"] = str(max(1, int(wait + 0.999)))
            raise err

    def embed_or_503(self, strategy: str, image) -> tuple[np.ndarray, dict[str, float]]:
        try:
            return self.matcher.embed(strategy, image)
        except WeightsUnavailable as e:
            raise APIError(503, "weights_unavailable", f"image search is unavailable for {strategy}: {e}") from None

    def upload_payload(self, strategy: str, k: int, host_url: str) -> tuple[dict, dict[str, float], Upload]:
        """Matches for the image uploaded with the current request (multipart 'image' or raw image/* body)."""
        settings = self.settings
        buffer_body(settings.max_upload_bytes, settings.upload_timeout, settings.upload_read_timeout)
        upload = decode_upload(read_upload_bytes(), settings.max_image_pixels)
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
    def fallback_match(self, appid: int, strategy: str, k: int, host_url: str) -> dict | None:
        if self.fetcher is None:
            return None
        key = (appid, strategy)
        cached = self.fetcher.cached(key)
        if cached is None:
            cached = self._fetch_and_embed(appid, strategy)
            self.fetcher.remember(key, cached)
        if cached is ABSENT:
            raise APIError(
                404, "unknown_appid", f"appid {appid} is not in the index and Steam has no banner for it", appid=appid
            )
        vec = cached
        found = self.matcher.search(strategy, vec, k)
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
        try:
            data = self.fetcher.fetch(appid)
        except FetchFailed as e:
            raise APIError(502, "fallback_failed", f"appid {appid} is not in the index and {e}") from None
        if data is None:
            return ABSENT
        try:
            image = open_image(data, max_pixels=self.settings.max_image_pixels)
        except ImageRejected as e:
            raise APIError(502, "fallback_failed", f"the CDN's banner for {appid} is not usable: {e.message}") from None
        vec, _ = self.embed_or_503(strategy, image)
        return vec


def get_service() -> Service:
    """The app's service; a 503 ``starting`` while a fetched index is not ready yet (app/boot.py)."""
    service = current_app.extensions.get(EXTENSION_KEY)
    if service is None:
        raise starting_error()
    return service


def starting_error() -> APIError:
    from .boot import BOOT_KEY

    boot = current_app.extensions.get(BOOT_KEY)
    detail = boot.detail if boot is not None else "starting"
    err = APIError(503, "starting", f"the service is starting: {detail}; try again shortly")
    err.headers["Retry-After"] = "5"
    return err
