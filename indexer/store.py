"""The Steam store's own answers: its list of games and each game's store metadata.

- ``IStoreService/GetAppList/v1`` (a Steam Web API key): every game, in pages of up to 50,000, or those changed
  since a time (``if_modified_since``).
- SteamSpy's ``api.php?request=all&page=N`` (keyless): 1,000 games a page, one page a minute, a partial list.
- ``IStoreBrowseService/GetItems/v1``: each game's store metadata, banner path included (``core/store_items.py``).

Every call waits for its service's rate and is retried under a RetryPolicy; what cannot be read is left out.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from core.http import RetryPolicy, TransientError, check_status, read_body, with_retries
from core.store_items import ITEMS_PATH, clean_name, items_entries, items_params, valid_appid, web_api_response

USER_AGENT = "steam-dino-banners/0.1 (catalog)"
MAX_ANSWER_BYTES = 64 << 20  # far above a GetAppList page of 50,000 games


@dataclass
class ListPage:
    """A page of a game list: [appid, name, last_modified or None] per game, and the next page's cursor
    (GetAppList's ``last_appid``, SteamSpy's page number), None after the last."""

    apps: list[list[Any]]
    next: int | None


@dataclass
class Throttle:
    """At most one call per ``interval`` seconds: a service's rate limit, kept rather than learnt from 429s."""

    interval: float
    next: float = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self.next:
            time.sleep(self.next - now)
        self.next = max(now, self.next) + self.interval


class StoreClient:
    """The three services' calls, each throttled, retried and checked; ``calls`` counts the requests made."""

    def __init__(
        self,
        api_url: str,
        steamspy_url: str,
        key: str | None,
        *,
        policy: RetryPolicy,
        timeout: float,
        store_interval: float,
        steamspy_interval: float,
        on_retry: Callable[[Exception, int, float], object] | None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.steamspy_url = steamspy_url
        self.key = key
        self.policy = policy
        self.timeout = timeout
        self.store = Throttle(store_interval)
        self.steamspy = Throttle(steamspy_interval)
        self.on_retry = on_retry
        self.calls = 0
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def _call(self, url: str, params: dict[str, Any], throttle: Throttle, parse: Callable[[Any], Any]) -> Any:
        """GET ``url`` and ``parse`` its JSON; a malformed body or answer (``parse`` raising TransientError) is
        retried like a 5xx."""

        def once() -> Any:
            throttle.wait()
            self.calls += 1
            with self.session.get(url, params=params, timeout=self.timeout, stream=True) as resp:
                check_status(resp)
                deadline = time.monotonic() + 10 * self.timeout
                body = read_body(resp, max_bytes=MAX_ANSWER_BYTES, deadline=deadline)
            try:
                data = json.loads(body)
            except ValueError:
                raise TransientError(f"malformed JSON from {url}") from None
            return parse(data)

        return with_retries(once, self.policy, on_retry=self.on_retry)

    def app_list(self, last_appid: int, since: int | None = None) -> ListPage:
        """One page of every game on the store (a key is needed), after ``last_appid``, changed since ``since``."""
        params = {"key": self.key, "include_games": "true", "max_results": 50000, "last_appid": last_appid}
        if since:
            params["if_modified_since"] = since

        def parse(data: Any) -> ListPage:
            page = web_api_response(data, "GetAppList")
            apps = [
                [a["appid"], clean_name(a.get("name")), m if isinstance(m := a.get("last_modified"), int) else None]
                for a in page.get("apps") or []
                if isinstance(a, dict) and valid_appid(a.get("appid"))
            ]
            if page.get("have_more_results") is not True:
                return ListPage(apps, None)
            after = page.get("last_appid")
            if valid_appid(after) is None or after <= last_appid:  # a cursor that does not move would loop forever
                raise TransientError(f"GetAppList: have_more_results without a later last_appid ({after!r})")
            return ListPage(apps, after)

        return self._call(f"{self.api_url}/IStoreService/GetAppList/v1/", params, self.store, parse)

    def steamspy_page(self, page: int) -> ListPage:
        """SteamSpy's page ``page`` of its games (1,000 a page); an empty page ends the list."""

        def parse(data: Any) -> ListPage:
            if not isinstance(data, dict | list):
                raise TransientError(f"SteamSpy page {page}: not a JSON object")
            entries = list(data.values() if isinstance(data, dict) else data)
            apps = [
                [g["appid"], clean_name(g.get("name")), None]
                for g in entries
                if isinstance(g, dict) and valid_appid(g.get("appid"))
            ]
            return ListPage(apps, page + 1 if entries else None)

        params = {"request": "all", "page": page}
        return self._call(self.steamspy_url, params, self.steamspy, parse)

    def items(self, appids: list[int]) -> dict[int, dict[str, Any] | None]:
        """Each appid's catalog entry from GetItems (``store_entry``), None for one the store does not describe."""
        parse = functools.partial(items_entries, appids=appids)
        return self._call(f"{self.api_url}{ITEMS_PATH}", items_params(appids), self.store, parse)
