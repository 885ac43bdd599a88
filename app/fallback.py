"""Optional (FALLBACK_FETCH=1): lookups of games the index lacks, from their banner in the Steam store.

It asks the store for the game's banner path (GetItems on STEAM_API_URL), then fetches that banner under the store
assets' base (STEAM_ASSETS_URL; the plain path for a game the store gave none), and reaches nothing else: the path
is checked as an asset path, redirects are not followed, bodies are capped, and both requests share one deadline
(FALLBACK_TIMEOUT) in a small thread pool, so a trickling server cannot hold a request. Embeddings and "no banner"
are remembered until evicted (LRU), failures for FALLBACK_NEGATIVE_TTL, and concurrent misses of one key share one
fetch and one model pass (``SingleFlight``).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import requests
from PIL import Image

from core.http import BodyTooLarge, TransientError, read_body
from core.images import ImageRejected
from core.steam import asset_url, plain_banner_path
from core.store_items import ITEMS_PATH, items_entries, items_params
from core.variants import apply_variant

from .config import Settings
from .problems import UpstreamFailed, unknown_app
from .uploads import decode_upload

FETCH_THREADS = 4  # downloads in flight per worker; more wait in the pool's queue, within their deadline
ABSENT = "absent"  # remembered: Steam has no banner for this appid


class FetchFailed(RuntimeError):
    """The store could not be used (unreachable, timeout, redirect, too large, error status, unreadable answer)."""


class BannerFetcher:
    """A game's banner as the store describes it: GetItems, then the banner, within one deadline."""

    def __init__(self, api_url: str, assets_url: str, timeout_s: float, max_bytes: int) -> None:
        self.api_url, self.assets_url = api_url, assets_url
        self.timeout_s, self.max_bytes = timeout_s, max_bytes
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy from the environment: only the store's hosts, directly
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="cdn-fetch")

    def fetch(self, appid: int) -> tuple[str, bytes | None] | None:
        """(the banner's URL, its bytes or None when the CDN has none), or None when the store does not describe
        the game; FetchFailed past the deadline or when the store cannot be used."""
        future = self._pool.submit(self._fetch, int(appid), time.monotonic() + self.timeout_s)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise FetchFailed(f"the store took longer than {self.timeout_s:g} s") from None

    def _fetch(self, appid: int, deadline: float) -> tuple[str, bytes | None] | None:
        answer = self._get(f"{self.api_url}{ITEMS_PATH}", deadline, items_params([appid]))
        try:
            entry = items_entries(json.loads(answer or b"null"), [appid])[appid]
        except (ValueError, TransientError):
            raise FetchFailed("the store's GetItems answer is not readable") from None
        if entry is None:
            return None
        url = asset_url(entry.get("banner") or plain_banner_path(appid), self.assets_url)
        return url, self._get(url, deadline)

    def _get(self, url: str, deadline: float, params: dict | None = None) -> bytes | None:
        """One GET (None for 403/404), its body read as it arrives so that the deadline is checked after every
        receive."""
        timeout = (self.timeout_s, self.timeout_s)
        try:
            with self._session.get(url, params=params, timeout=timeout, stream=True, allow_redirects=False) as r:
                if r.status_code in (403, 404):
                    return None
                if r.is_redirect or r.is_permanent_redirect:
                    raise FetchFailed(f"the store redirected {url} elsewhere; redirects are not followed")
                if r.status_code != 200:
                    raise FetchFailed(f"the store answered {r.status_code} for {url}")
                return read_body(r, max_bytes=self.max_bytes, deadline=deadline)
        except FetchFailed:
            raise
        except BodyTooLarge:
            raise FetchFailed(f"the answer is larger than {self.max_bytes} bytes") from None
        except requests.Timeout:
            raise FetchFailed(f"the store took longer than {self.timeout_s:g} s") from None
        except Exception as e:  # requests' and urllib3's own errors from raw reads (protocol, timeouts)
            raise FetchFailed(f"could not fetch {url}: {type(e).__name__}") from None


class CdnFallback:
    """The embedding of an unindexed game's store banner and its URL, per (appid, strategy, variant), remembered."""

    def __init__(self, settings: Settings, embed: Callable[[str, Image.Image], np.ndarray]) -> None:
        max_bytes = int(settings.fallback_max_mb * 2**20)
        self.fetcher = BannerFetcher(settings.steam_api_url, settings.assets_url, settings.fallback_timeout, max_bytes)
        self.settings = settings
        self._embed = embed  # (strategy, image) -> embedding: a model pass
        self._cache: OrderedDict[tuple, tuple[float, object]] = OrderedDict()  # key -> (expires, value)
        self._lock = threading.Lock()
        self.flights = SingleFlight()

    def needs_fetch(self, appid: int, strategy: str, variant: str = "") -> bool:
        """Whether the answer costs a fetch and a model pass (nothing remembered for it)."""
        return self._cached((appid, strategy, variant)) is None

    def embedding(self, appid: int, strategy: str, variant: str, resize_to) -> tuple[np.ndarray, str]:
        """The banner's embedding and URL; NotFound when Steam has none, UpstreamFailed when the store fails us."""
        key = (appid, strategy, variant)
        found = self._cached(key)
        if found is None:
            found = self.flights.run(key, lambda: self._fetch_and_embed(key, resize_to))
        if isinstance(found, UpstreamFailed):  # a fresh exception: the remembered one is shared between threads
            raise UpstreamFailed(found.code, found.message)
        if found is ABSENT:
            raise unknown_app(appid, "is not in the index and Steam has no banner for it")
        return found

    def _fetch_and_embed(self, key: tuple, resize_to) -> object:
        """(embedding, URL), ABSENT, or an UpstreamFailed; each remembered (failures for FALLBACK_NEGATIVE_TTL)."""
        appid, strategy, variant = key
        try:
            url, data = self.fetcher.fetch(appid) or ("", None)
            if data is None:
                return self._remember(key, ABSENT)
            image = decode_upload(data, self.settings, resize_to).image
        except FetchFailed as e:
            why = f"appid {appid} is not in the index and {e}"
        except ImageRejected as e:
            why = f"the store's banner for {appid} is not usable: {e.message}"
        else:
            return self._remember(key, (self._embed(strategy, apply_variant(image, variant)), url))
        return self._remember(key, UpstreamFailed("fallback_failed", why), ttl_s=self.settings.fallback_negative_ttl)

    def _cached(self, key: tuple) -> object | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._cache[key]
                return None
            self._cache.move_to_end(key)
            return entry[1]

    def _remember(self, key: tuple, value: object, ttl_s: float | None = None) -> object:
        """Keep ``value`` until evicted, or for ``ttl_s`` seconds; returns it."""
        size = self.settings.fallback_cache_size
        expires = float("inf") if ttl_s is None else time.monotonic() + ttl_s
        with self._lock:
            self._cache[key] = (expires, value)
            self._cache.move_to_end(key)
            while len(self._cache) > size:
                self._cache.popitem(last=False)
        return value


class SingleFlight:
    """Concurrent calls for one key share one run of the work: the first caller runs it, the others wait."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[object, _Flight] = {}

    def run(self, key: object, work: Callable[[], object]) -> object:
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            return flight.result
        try:
            flight.result = work()
            return flight.result
        except BaseException as e:
            flight.error = e
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None
