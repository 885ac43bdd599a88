"""Optional: embed the banner of a game that is not in the index, fetched from the Steam CDN.

Off by default (FALLBACK_FETCH=1 turns it on). It can only ever reach the
configured CDN: the URL is built from an integer appid and the CDN base,
redirects are refused (a redirect elsewhere is an error, not a hop), and the
body is capped. The whole download has one deadline (FALLBACK_TIMEOUT), not
one per read: it runs in a small pool of fetch threads and the request waits
at most that long, so a CDN trickling a byte a second cannot hold a request
thread. Results are cached: embeddings and "Steam has no banner" until
evicted (LRU), failures for a TTL (FALLBACK_NEGATIVE_TTL), so a broken banner
is not fetched again on every request. Concurrent misses for one key share
one fetch and one model pass (``SingleFlight``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from urllib.parse import urlparse

import requests

from core.steam import banner_url, is_ascii_digits

FETCH_THREADS = 4  # downloads in flight per worker; more wait in the pool's queue, within their deadline


class FetchFailed(RuntimeError):
    """The CDN could not be used (unreachable, timeout, redirect, too large, error status)."""


class BannerFetcher:
    def __init__(
        self, cdn_url: str, timeout_s: float, max_bytes: int, cache_size: int, negative_ttl_s: float = 300.0
    ) -> None:
        parsed = urlparse(cdn_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) CDN URL: {cdn_url!r}")
        self.cdn_url = cdn_url
        self.host = parsed.hostname
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self.negative_ttl_s = negative_ttl_s
        self._cache: OrderedDict[object, tuple[float, object]] = OrderedDict()  # key -> (expires, value)
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy from the environment: only the CDN, directly
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="cdn-fetch")
        self.flights = SingleFlight()

    def url(self, appid: int) -> str:
        url = banner_url(int(appid), self.cdn_url)
        if urlparse(url).hostname != self.host:  # cannot happen with an int appid; checked anyway
            raise FetchFailed(f"refusing to fetch {url}: not the CDN host {self.host}")
        return url

    def fetch(self, appid: int) -> bytes | None:
        """The banner's bytes, or None when the CDN says it has none (404/403); FetchFailed past the deadline."""
        deadline = time.monotonic() + self.timeout_s
        future = self._pool.submit(self._download, self.url(appid), deadline)
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeout:
            raise FetchFailed(f"the CDN took longer than {self.timeout_s:g} s") from None

    def _download(self, url: str, deadline: float) -> bytes | None:
        """One GET, read with read1 so that the deadline is checked after every receive, not every 64 KB."""
        try:
            with self._session.get(
                url, timeout=(self.timeout_s, self.timeout_s), stream=True, allow_redirects=False
            ) as r:
                if r.status_code in (403, 404):
                    return None
                if r.is_redirect or r.is_permanent_redirect:
                    raise FetchFailed(f"the CDN redirected {url} elsewhere; redirects are not followed")
                if r.status_code != 200:
                    raise FetchFailed(f"the CDN answered {r.status_code} for {url}")
                declared = r.headers.get("Content-Length")
                if declared and is_ascii_digits(declared) and int(declared) > self.max_bytes:
                    raise FetchFailed(f"the banner is larger than {self.max_bytes} bytes")
                body = bytearray()
                while chunk := r.raw.read1(65536, decode_content=True):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise FetchFailed(f"the banner is larger than {self.max_bytes} bytes")
                    if time.monotonic() > deadline:
                        raise FetchFailed(f"the CDN took longer than {self.timeout_s:g} s")
                return bytes(body)
        except requests.RequestException as e:
            raise FetchFailed(f"could not fetch {url}: {type(e).__name__}") from None
        except Exception as e:  # urllib3's own errors from raw reads (protocol, timeouts)
            if isinstance(e, FetchFailed):
                raise
            raise FetchFailed(f"could not fetch {url}: {type(e).__name__}") from None

    # -- a small LRU for results, with an expiry for failures ----------------------------------------
    def cached(self, key: object) -> object | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            if entry[0] < time.monotonic():
                del self._cache[key]
                return None
            self._cache.move_to_end(key)
            return entry[1]

    def remember(self, key: object, value: object, ttl_s: float | None = None) -> None:
        """Keep value for key: until evicted, or for ttl_s seconds (failures)."""
        if self.cache_size <= 0:
            return
        expires = float("inf") if ttl_s is None else time.monotonic() + ttl_s
        with self._lock:
            self._cache[key] = (expires, value)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)


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
