"""Steam URLs: a game's store page and its banner, and the store's settings (environment variables).

The store gives each game's banner path (``IStoreBrowseService/GetItems``: under the assets' base, maybe under a
content hash, with a ``?t=`` token); the plain path is the fallback for a game it gave none, never a guess.
"""

from __future__ import annotations

import os
import re

BANNER_FILE = "library_600x900.jpg"
STORE_URL = "https://store.steampowered.com/app/{appid}/"
ASSETS_URL = "https://shared.steamstatic.com/store_item_assets/"  # STEAM_ASSETS_URL
API_URL = "https://api.steampowered.com"  # STEAM_API_URL
STEAMSPY_URL = "https://steamspy.com/api.php"  # STEAMSPY_URL
# A path relative to the assets' base, as the store gives it: no scheme, no "..", an optional plain query.
_ASSET_PATH = re.compile(r"(?!.*\.\.)[A-Za-z0-9_-][A-Za-z0-9_./-]*(\?[A-Za-z0-9_.=&-]*)?")


def setting(name: str, default: str) -> str:
    """A Steam setting from the environment (STEAM_ASSETS_URL, STEAM_API_URL, STEAMSPY_URL, STEAM_API_KEY)."""
    return os.environ.get(name, "").strip() or default


def plain_banner_path(appid: int) -> str:
    """The banner's path before content hashes: right for a game that never re-uploaded its art."""
    return f"steam/apps/{int(appid)}/{BANNER_FILE}"


def is_asset_path(path: object) -> bool:
    """Whether ``path`` is a safe path under the assets' base (it cannot name another host or climb out)."""
    return isinstance(path, str) and len(path) <= 500 and _ASSET_PATH.fullmatch(path) is not None


def banner_asset_url(appid: int, path: str | None, base: str) -> str:
    """The URL of a game's banner under the assets' base: the store's path, or the plain one where it gave none."""
    return f"{base.rstrip('/')}/{path or plain_banner_path(appid)}"


def store_url(appid: int) -> str:
    """The game's Steam store page."""
    return STORE_URL.format(appid=int(appid))


def is_ascii_digits(text: str) -> bool:
    """True for "620", False for "", "-1", "6.2" and for Unicode digits such as "²" that int() rejects."""
    return text.isascii() and text.isdigit()
