"""Optional: embed the banner of a game that is not in the index, fetched from the Steam CDN.

Off by default (FALLBACK_FETCH=1 turns it on). It can only ever reach the
configured CDN: the URL is built from an integer appid and the CDN base,
redirects are refused (a redirect elsewhere is an error, not a hop), the
connection, each read and the whole body are timed out, and the body is
capped (core/http.py). Results
(including "Steam has no banner for this appid") are cached, so a repeated
lookup costs nothing and the CDN is not hammered.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from urllib.parse import urlparse

import requests

from core.http import BodyTooLarge, read_body
from core.steam import banner_url


class FetchFailed(RuntimeError):
    """The CDN could not be used (unreachable, timeout, redirect, too large, error status)."""


class BannerFetcher:
    def __init__(self, cdn_url: str, timeout_s: float, max_bytes: int, cache_size: int) -> None:
        parsed = urlparse(cdn_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) CDN URL: {cdn_url!r}")
        self.cdn_url = cdn_url
        self.host = parsed.hostname
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.cache_size = cache_size
        self._cache: OrderedDict[object, object] = OrderedDict()
        self._lock = threading.Lock()
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy from the environment: only the CDN, directly

    def url(self, appid: int) -> str:
        url = banner_url(int(appid), self.cdn_url)
        if urlparse(url).hostname != self.host:  # cannot happen with an int appid; checked anyway
            raise FetchFailed(f"refusing to fetch {url}: not the CDN host {self.host}")
        return url

    def fetch(self, appid: int) -> bytes | None:
        """The banner's bytes, or None when the CDN says it has none (404/403)."""
        url = self.url(appid)
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
                return read_body(r, max_bytes=self.max_bytes, deadline=time.monotonic() + 2 * self.timeout_s)
        except BodyTooLarge:
            raise FetchFailed(f"the banner is larger than {self.max_bytes} bytes") from None
        except requests.RequestException as e:
            raise FetchFailed(f"could not fetch {url}: {type(e).__name__}") from None

    # -- a small LRU for results ---------------------------------------------------------------------
    def cached(self, key: object) -> object | None:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        return None

    def remember(self, key: object, value: object) -> None:
        if self.cache_size <= 0:
            return
        with self._lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
