"""The store's description of its games: ``IStoreBrowseService/GetItems/v1`` (keyless, a GET with a URL-encoded
``input_json``), for the catalog and the service's fallback for unindexed games. What cannot be read is left out,
names lose control characters, and banner paths must be safe paths under the store assets' base.
"""

from __future__ import annotations

import json
import unicodedata
from datetime import datetime, timezone
from typing import Any

from core.http import TransientError
from core.steam import is_asset_path

ITEMS_PATH = "/IStoreBrowseService/GetItems/v1/"  # under the Steam Web API's base (STEAM_API_URL)
# IStoreBrowseService's EStoreAppType, by value.
STORE_TYPES = ("game", "demo", "mod", "movie", "dlc", "guide", "software", "video", "series", "episode")
STORE_TYPES += ("hardware", "music", "beta", "tool", "advertising")


def clean_name(value: object) -> str:
    """A game's name as text: control characters and lone surrogates dropped, whitespace runs made one space."""
    if not isinstance(value, str):
        return ""
    kept = "".join(c for c in value if unicodedata.category(c) not in ("Cc", "Cs"))
    return " ".join(kept.split())[:500]


def valid_appid(value: object) -> int | None:
    """``value`` when it is an appid the store could send (a positive uint32), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**32 else None


def store_entry(item: object) -> dict[str, Any] | None:
    """A catalog entry from one GetItems item, or None for an item the store does not describe (``success`` not 1,
    ``visible`` false: unknown or delisted) or cannot be read."""
    if not isinstance(item, dict) or item.get("success") != 1 or item.get("visible") is False:
        return None
    appid = valid_appid(item.get("appid", item.get("id")))
    if appid is None:
        return None
    entry: dict[str, Any] = {"appid": appid, "name": clean_name(item.get("name"))}
    kind = item.get("type")
    if isinstance(kind, int) and 0 <= kind < len(STORE_TYPES):
        entry["type"] = STORE_TYPES[kind]
    release = item.get("release")
    when = release.get("steam_release_date") if isinstance(release, dict) else None
    if valid_appid(when):  # seconds since 1970, within the uint32 the store uses
        entry["release_date"] = datetime.fromtimestamp(when, timezone.utc).date().isoformat()
    assets = item.get("assets") if isinstance(item.get("assets"), dict) else {}
    template, capsule = assets.get("asset_url_format"), assets.get("library_capsule")
    if isinstance(template, str) and "${FILENAME}" in template and isinstance(capsule, str):
        path = template.replace("${FILENAME}", capsule)
        if is_asset_path(path):
            entry["banner"] = path
    return entry


def items_params(appids: list[int]) -> dict[str, str]:
    """The GET parameters of one GetItems call for these appids (names, types, release dates and assets)."""
    request = {
        "ids": [{"appid": a} for a in appids],
        "context": {"language": "english", "country_code": "US"},
        "data_request": {"include_assets": True, "include_release": True},
    }
    return {"input_json": json.dumps(request, separators=(",", ":"))}


def items_entries(data: Any, appids: list[int]) -> dict[int, dict[str, Any] | None]:
    """Each asked appid's ``store_entry`` from a GetItems answer (its JSON), None for one the store does not
    describe; TransientError (worth a retry) for an answer that is not one."""
    items = web_api_response(data, "GetItems").get("store_items") or []
    if not isinstance(items, list):
        raise TransientError("GetItems: store_items is not a list")
    found: dict[int, dict[str, Any]] = {}
    for entry in map(store_entry, items):
        if entry is not None:
            found.setdefault(entry["appid"], entry)  # a repeated item: the first answer counts
    return {a: found.get(a) for a in appids}


def web_api_response(data: Any, what: str) -> dict[str, Any]:
    """The ``response`` object of a Web API answer; TransientError (retried) when there is none."""
    page = data.get("response") if isinstance(data, dict) else None
    if not isinstance(page, dict):
        raise TransientError(f"{what}: the answer has no 'response' object")
    return page
