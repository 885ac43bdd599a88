"""The service behind the API and the pages: index, catalog, matcher and the payloads they share.

One instance per process, created by ``create_app`` and kept in ``app.extensions``. It knows nothing of HTTP: it
takes plain values (an appid, an upload's bytes, a base URL) and raises domain problems (``app/problems.py``); the
blueprints read requests and ``app/errors.py`` maps problems to status codes.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np

from core.dino.strategies import DEFAULT_STRATEGY
from core.dino.weights import ModelCache, WeightsUnavailable
from core.images import ImageRejected
from core.index import LoadedIndex
from core.steam import store_url
from core.variants import apply_variant

from . import metrics
from .catalog import Catalog, Game
from .config import Settings
from .fallback import CdnFallback
from .http_cache import HttpCache, build_id
from .matching import Matcher
from .problems import Forbidden, Unavailable, unknown_app, variant_unavailable
from .uploads import Upload, decode_upload
from .urlfetch import UrlFetcher, public_only

_PATH = re.compile(r"(?<![\w:/.])/(?:[^\s/]+/)+(?=[^\s/])")  # an absolute path's folders (not a URL's)


def without_paths(text: str) -> str:
    """A message for clients: server paths shortened to their last part ("…/checkpoints/x.pth" stays useful)."""
    return _PATH.sub("…/", text)


log = logging.getLogger(__name__)


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
        self.matcher = Matcher(
            index,
            allow_download=settings.allow_weights_download,
            retry_seconds=settings.weights_retry_seconds,
            torch_threads=settings.torch_threads,
            concurrent_forwards=settings.concurrent_forwards,
            models=ModelCache(),  # one model per backbone for this app, shared by its strategies
            on_model_load=metrics.model_loaded,
        )
        self.build_id = build_id(index)
        self.http_cache = HttpCache(self.build_id, settings.cache_max_age)
        self.url_fetcher = (
            UrlFetcher(
                settings.url_fetch_timeout,
                int(settings.url_fetch_max_mb * 2**20),
                public_only(settings.url_fetch_allow_networks),
            )
            if settings.url_fetch
            else None
        )
        self.preload = self._named("PRELOAD_MODELS", settings.preload_models)
        # the CDN fallback (FALLBACK_FETCH), or None
        self.fetcher = (
            CdnFallback(settings, lambda s, image: self.embed_or_503(s, image)[0]) if settings.fallback_fetch else None
        )

    def _named(self, setting: str, wanted: list[str]) -> list[str]:
        """A setting's strategies resolved to the index's (``all``: every one); a name it lacks stops start-up."""
        if wanted == ["all"] and setting == "PRELOAD_MODELS":
            return list(self.strategy_names)
        resolved = [self.resolve_strategy(w) for w in wanted]
        unknown = [w for w, r in zip(wanted, resolved, strict=True) if r is None]
        if unknown:
            raise ValueError(
                f"{setting}={','.join(wanted)!r}: {', '.join(unknown)} not in the index {self.index.path} "
                f"(it has {', '.join(self.strategy_names)})"
            )
        return list(dict.fromkeys(resolved))

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
            "variants": sorted(s.variants),
            "default": name == self.default_strategy,
        }

    def preload_models(self, wanted: list[str] | None = None) -> None:
        """Load the backbones (and searchers) of these strategies now rather than on the first upload."""
        for name in self._named("PRELOAD_MODELS", wanted) if wanted is not None else self.preload:
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

    def table_payload_json(self, *args, **kwargs) -> str:
        """``table_payload`` as compact JSON: a lookup's answer."""
        return compact_json(self.table_payload(*args, **kwargs))

    def batch_payload_json(
        self, strategy: str, appids: list[int], k: int, host_url: str, offset: int = 0, variant: str = ""
    ) -> str:
        """Lookups of many appids in one answer: each one's match payload, or its error, in the order asked."""
        results = []
        for appid in appids:
            game = self.catalog.get(appid)
            if game is None:
                problem = unknown_app(appid)
                results.append({"appid": appid, "error": {"code": problem.code, "message": problem.message}})
            else:
                results.append(self.table_payload(strategy, game, k, host_url, offset, variant))
        batch = {"strategy": strategy, "k": k, "offset": offset, "variant": variant, "results": results}
        return compact_json(batch)

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
        self,
        data: bytes,
        strategy: str,
        k: int,
        host_url: str,
        *,
        offset: int = 0,
        variant: str = "",
        embedding: bool = False,
    ) -> tuple[dict, dict[str, float], Upload]:
        """Matches for an uploaded image's bytes, decoded with the configured limits (mirrored/flipped first)."""
        upload = decode_upload(data, self.settings, self._resize_to(strategy))
        vec, timings = self.embed_or_503(strategy, apply_variant(upload.image, variant))
        found = self.matcher.search(strategy, vec, offset + k)
        timings = {"decode": upload.decode_ms, **timings, **found.timings_ms}
        rows, scores = found.rows[offset:], found.scores[offset:]
        payload = self.match_payload(strategy, upload.describe(), rows, scores, host_url, offset, variant)
        if embedding:
            payload["embedding"] = np.asarray(vec, dtype=np.float32).tolist()
        metrics.upload_timed(strategy, timings)
        return payload, timings, upload

    def fetch_url(self, url: str) -> bytes:
        """The image at a client's URL (POST /match {"url": ...}), when URL_FETCH is on."""
        if self.url_fetcher is None:
            raise Forbidden("url_fetch_disabled", "queries by URL are switched off here (URL_FETCH=1 enables them)")
        return self.url_fetcher.fetch(url)

    def unique_payload(self, strategy: str, n: int, host_url: str, offset: int = 0) -> list[dict]:
        out = []
        for row in self.matcher.unique(strategy, offset + n)[offset:]:
            entry = self.catalog.describe_row(row, host_url)
            rows, scores = self.matcher.table_matches(strategy, row, 1)
            if len(rows):
                best = self.catalog.game(int(rows[0]))
                entry["best_match"] = {"appid": best.appid, "name": best.name, "score": round(float(scores[0]), 6)}
            out.append(entry)
        return out

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

    # -- unknown appids: the optional CDN fallback (app/fallback.py) ---------------------------------
    def fallback_needs_fetch(self, appid: int, strategy: str, variant: str = "") -> bool:
        """Whether a lookup of this appid would fetch and embed a banner: it then counts as an upload."""
        return (
            self.fetcher is not None
            and self.catalog.get(appid) is None
            and self.fetcher.needs_fetch(appid, strategy, variant)
        )

    def fallback_match(
        self, appid: int, strategy: str, k: int, host_url: str, offset: int = 0, variant: str = ""
    ) -> dict:
        """Matches for a game that is not in the index, from its store banner (when FALLBACK_FETCH is on)."""
        if self.fetcher is None:
            raise unknown_app(appid)
        vec, banner_url = self.fetcher.embedding(appid, strategy, variant, self._resize_to(strategy))
        found = self.matcher.search(strategy, vec, offset + k)
        query = {"appid": appid, "name": "", "store_url": store_url(appid), "banner_url": banner_url}
        query["source"] = "steam_cdn"
        rows, scores = found.rows[offset:], found.scores[offset:]
        return self.match_payload(strategy, query, rows, scores, host_url, offset, variant)


def compact_json(obj: object) -> str:
    """JSON as the app's provider writes it (compact, keys in order, ASCII), without its trailing newline."""
    return json.dumps(obj, separators=(",", ":"))
