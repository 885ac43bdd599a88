"""The Steam store's own answers: its list of games and each game's store metadata.

- ``IStoreService/GetAppList/v1`` (a Steam Web API key): every game, in pages of up to 50,000
  (``last_appid`` / ``have_more_results``), or those changed since a time (``if_modified_since``).
- SteamSpy's ``api.php?request=all&page=N`` (keyless): 1,000 games a page, one page a minute, a partial list.
  (``steamspypi`` answers ``{}`` for an error as for the end of the list, without timeout or retries.)
- ``IStoreBrowseService/GetItems/v1`` (keyless, a GET with a URL-encoded ``input_json``): per game its name,
  type, release date and banner path (``asset_url_format`` with ``${FILENAME}`` -> ``library_capsule``).

Every call waits for its service's rate (``Throttle``) and is retried under a RetryPolicy. Answers are checked:
what cannot be read is left out; names lose control characters; banner paths must be safe asset paths.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import requests

from core.http import RetryPolicy, TransientError, check_status, read_body, with_retries
from core.steam import is_asset_path

USER_AGENT = "steam-dino-banners/0.1 (catalog)"
MAX_ANSWER_BYTES = 64 << 20  # a GetAppList page of 50,000 games is about 4 MB
# IStoreBrowseService's EStoreAppType, by value.
STORE_TYPES = ("game", "demo", "mod", "movie", "dlc", "guide", "software", "video", "series", "episode")
STORE_TYPES += ("hardware", "music", "beta", "tool", "advertising")


@dataclass
class ListPage:
    """A page of a game list: [appid, name, last_modified or None] per game, and the next page's cursor
    (GetAppList's ``last_appid``, SteamSpy's page number), None after the last."""

    apps: list[list[Any]]
    next: int | None


class Throttle:
    """At most one call per ``interval`` seconds: a service's rate limit, kept rather than learnt from 429s."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next = 0.0

    def wait(self) -> None:
        now = time.monotonic()
        if now < self._next:
            time.sleep(self._next - now)
        self._next = max(now, self._next) + self.interval


def clean_name(value: object) -> str:
    """A game's name as text: control characters and lone surrogates dropped, whitespace runs made one space."""
    if not isinstance(value, str):
        return ""
    kept = "".join(c for c in value if unicodedata.category(c) not in ("Cc", "Cs"))
    return " ".join(kept.split())[:500]


def _appid(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**32 else None


def store_entry(item: object) -> dict[str, Any] | None:
    """A catalog entry from one GetItems item, or None for an item the store does not describe (``success`` not 1,
    ``visible`` false: unknown or delisted) or cannot be read."""
    if not isinstance(item, dict) or item.get("success") != 1 or item.get("visible") is False:
        return None
    appid = _appid(item.get("appid", item.get("id")))
    if appid is None:
        return None
    entry: dict[str, Any] = {"appid": appid, "name": clean_name(item.get("name"))}
    kind = item.get("type")
    if isinstance(kind, int) and 0 <= kind < len(STORE_TYPES):
        entry["type"] = STORE_TYPES[kind]
    release = item.get("release")
    when = release.get("steam_release_date") if isinstance(release, dict) else None
    if _appid(when):  # seconds since 1970, within the uint32 the store uses
        entry["release_date"] = datetime.fromtimestamp(when, timezone.utc).date().isoformat()
    assets = item.get("assets") if isinstance(item.get("assets"), dict) else {}
    template, capsule = assets.get("asset_url_format"), assets.get("library_capsule")
    if isinstance(template, str) and "${FILENAME}" in template and isinstance(capsule, str):
        path = template.replace("${FILENAME}", capsule)
        if is_asset_path(path):
            entry["banner"] = path
    return entry


class StoreClient:
    """The three services' calls, each throttled, retried and checked; ``calls`` counts the requests made."""

    def __init__(
        self,
        api_url: str,
        steamspy_url: str,
        key: str | None = None,
        *,
        policy: RetryPolicy | None = None,
        timeout: float = 30.0,
        store_interval: float = 1.0,
        steamspy_interval: float = 60.0,
        on_retry: Callable[[Exception, int, float], object] | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.steamspy_url = steamspy_url
        self.key = key
        self.policy = policy or RetryPolicy(attempts=6, backoff_s=2.0, max_retry_after_s=300.0)
        self.timeout = timeout
        self.store = Throttle(store_interval)
        self.steamspy = Throttle(steamspy_interval)
        self.on_retry = on_retry
        self.calls = 0
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT

    def close(self) -> None:
        self.session.close()

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
            page = _response(data, "GetAppList")
            apps = [
                [a["appid"], clean_name(a.get("name")), m if isinstance(m := a.get("last_modified"), int) else None]
                for a in page.get("apps") or []
                if isinstance(a, dict) and _appid(a.get("appid"))
            ]
            if page.get("have_more_results") is not True:
                return ListPage(apps, None)
            after = page.get("last_appid")
            if _appid(after) is None or after <= last_appid:  # a cursor that does not move would loop forever
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
                if isinstance(g, dict) and _appid(g.get("appid"))
            ]
            return ListPage(apps, page + 1 if entries else None)

        params = {"request": "all", "page": page}
        return self._call(self.steamspy_url, params, self.steamspy, parse)

    def items(self, appids: list[int]) -> dict[int, dict[str, Any] | None]:
        """Each appid's catalog entry from GetItems (``store_entry``), None for one the store does not describe."""
        request = {
            "ids": [{"appid": a} for a in appids],
            "context": {"language": "english", "country_code": "US"},
            "data_request": {"include_assets": True, "include_release": True},
        }

        def parse(data: Any) -> dict[int, dict[str, Any] | None]:
            items = _response(data, "GetItems").get("store_items") or []
            if not isinstance(items, list):
                raise TransientError("GetItems: store_items is not a list")
            found: dict[int, dict[str, Any]] = {}
            for entry in map(store_entry, items):
                if entry is not None:
                    found.setdefault(entry["appid"], entry)  # a repeated item: the first answer counts
            return {a: found.get(a) for a in appids}

        params = {"input_json": json.dumps(request, separators=(",", ":"))}
        return self._call(f"{self.api_url}/IStoreBrowseService/GetItems/v1/", params, self.store, parse)


def _response(data: Any, what: str) -> dict[str, Any]:
    """The ``response`` object of a Web API answer; TransientError (retried) when there is none."""
    page = data.get("response") if isinstance(data, dict) else None
    if not isinstance(page, dict):
        raise TransientError(f"{what}: the answer has no 'response' object")
    return page
