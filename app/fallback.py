"""Optional (FALLBACK_FETCH=1): lookups of games the index lacks, from their banner in the Steam store.

It asks the store for the game's banner path (GetItems on STEAM_API_URL), then fetches that banner under the store
assets' base (STEAM_ASSETS_URL; the plain path for a game the store gave none), and reaches nothing else: the path
is checked as an asset path, redirects are not followed, bodies are capped, and both requests share one deadline
(FALLBACK_TIMEOUT) in a small thread pool, so a trickling server cannot hold a request. Embeddings and "no banner"
are remembered until evicted (LRU), failures for FALLBACK_NEGATIVE_TTL, and concurrent misses of one key share one
fetch and one model pass.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import requests
from PIL import Image

from core.http import BodyTooLarge, TransientError, read_body
from core.images import ImageRejected
from core.steam import banner_asset_url
from core.store_items import ITEMS_PATH, items_entries, items_params
from core.variants import apply_variant

from .config import Settings
from .problems import UpstreamFailed, unknown_app
from .uploads import decode_upload

FETCH_THREADS = 4  # downloads in flight per worker; more wait in the pool's queue, within their deadline
ABSENT = "absent"  # remembered: Steam has no banner for this appid


class FetchFailed(RuntimeError):
    """The store could not be used (unreachable, timeout, redirect, too large, error status, unreadable answer)."""


class CdnFallback:
    """The embedding of an unindexed game's store banner and its URL, per (appid, strategy, variant), remembered."""

    def __init__(self, settings: Settings, embed: Callable[[str, Image.Image], np.ndarray]) -> None:
        self.settings = settings
        self._embed = embed  # (strategy, image) -> embedding: a model pass
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy from the environment: only the store's hosts, directly
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="cdn-fetch")
        self._cache: OrderedDict[tuple, tuple[float, object]] = OrderedDict()  # key -> (expires, value)
        self._flights: dict[tuple, Future] = {}  # key -> the answer of the fetch in progress
        self._lock = threading.Lock()

    def needs_fetch(self, appid: int, strategy: str, variant: str = "") -> bool:
        """Whether the answer costs a fetch and a model pass (nothing remembered for it)."""
        return self._cached((appid, strategy, variant)) is None

    def embedding(self, appid: int, strategy: str, variant: str, resize_to) -> tuple[np.ndarray, str]:
        """The banner's embedding and URL; NotFound when Steam has none, UpstreamFailed when the store fails us."""
        key = (appid, strategy, variant)
        found = self._cached(key)
        if found is None:  # the flight checks again: a fetch of this key may have finished since
            found = self._shared(key, lambda: self._cached(key) or self._fetch_and_embed(key, resize_to))
        if isinstance(found, UpstreamFailed):  # a fresh exception: the remembered one is shared between threads
            raise UpstreamFailed(found.code, found.message)
        if found is ABSENT:
            raise unknown_app(appid, "is not in the index and Steam has no banner for it")
        return found

    def _shared(self, key: tuple, work: Callable[[], object]) -> object:
        """``work()``, run once for concurrent callers of one key: the first runs it, the others wait for it."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = Future()
        if leader:
            try:
                flight.set_result(work())
            except BaseException as e:
                flight.set_exception(e)
            finally:
                with self._lock:
                    del self._flights[key]
        return flight.result()

    def _fetch_and_embed(self, key: tuple, resize_to) -> object:
        """(embedding, URL), ABSENT, or an UpstreamFailed; each remembered (failures for FALLBACK_NEGATIVE_TTL)."""
        appid, strategy, variant = key
        try:
            found = self._fetch(appid)
            if found is None:
                return self._remember(key, ABSENT)
            url, data = found
            image = decode_upload(data, self.settings, resize_to).image
        except FetchFailed as e:
            why = f"appid {appid} is not in the index and {e}"
        except ImageRejected as e:
            why = f"the store's banner for {appid} is not usable: {e.message}"
        else:
            return self._remember(key, (self._embed(strategy, apply_variant(image, variant)), url))
        return self._remember(key, UpstreamFailed("fallback_failed", why), ttl_s=self.settings.fallback_negative_ttl)

    def _fetch(self, appid: int) -> tuple[str, bytes] | None:
        """(the banner's URL, its bytes), or None when the store does not describe the game or has no banner for
        it; FetchFailed past the deadline or when the store cannot be used."""
        timeout = self.settings.fallback_timeout
        future = self._pool.submit(self._fetch_by, appid, time.monotonic() + timeout)
        try:
            return future.result(timeout=timeout)
        except FutureTimeout:
            raise FetchFailed(f"the store took longer than {timeout:g} s") from None

    def _fetch_by(self, appid: int, deadline: float) -> tuple[str, bytes] | None:
        answer = self._get(f"{self.settings.steam_api_url}{ITEMS_PATH}", deadline, items_params([appid]))
        try:
            entry = items_entries(json.loads(answer), [appid])[appid]
        except (ValueError, TransientError):
            raise FetchFailed("the store's GetItems answer is not readable") from None
        if entry is None:
            return None
        url = banner_asset_url(appid, entry.get("banner"), self.settings.assets_url)
        banner = self._get(url, deadline, absent=(403, 404))
        return None if banner is None else (url, banner)

    def _get(self, url: str, deadline: float, params: dict | None = None, absent: tuple = ()) -> bytes | None:
        """One GET's body (None for an ``absent`` status), read as it arrives so that the deadline is checked after
        every receive."""
        timeout_s, max_bytes = self.settings.fallback_timeout, int(self.settings.fallback_max_mb * 2**20)
        try:
            with self._session.get(url, params=params, timeout=timeout_s, stream=True, allow_redirects=False) as r:
                if r.status_code in absent:
                    return None
                if r.is_redirect or r.is_permanent_redirect:
                    raise FetchFailed(f"the store redirected {url} elsewhere; redirects are not followed")
                if r.status_code != 200:
                    raise FetchFailed(f"the store answered {r.status_code} for {url}")
                return read_body(r, max_bytes=max_bytes, deadline=deadline)
        except FetchFailed:
            raise
        except BodyTooLarge:
            raise FetchFailed(f"the answer is larger than {max_bytes} bytes") from None
        except requests.Timeout:
            raise FetchFailed(f"the store took longer than {timeout_s:g} s") from None
        except Exception as e:  # requests' and urllib3's own errors from raw reads (protocol, timeouts)
            raise FetchFailed(f"could not fetch {url}: {type(e).__name__}") from None

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
        expires = float("inf") if ttl_s is None else time.monotonic() + ttl_s
        with self._lock:
            self._cache[key] = (expires, value)
            self._cache.move_to_end(key)
            while len(self._cache) > self.settings.fallback_cache_size:
                self._cache.popitem(last=False)
        return value
