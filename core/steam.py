"""Steam URLs: where a game's store page and its vertical banner live.

Shared by the API (links in responses), the banner downloader and the
optional on-the-fly banner fetch, so that the CDN layout is written once.
"""

from __future__ import annotations

DEFAULT_CDN_URL = "https://cdn.cloudflare.steamstatic.com/steam/apps"
BANNER_FILE = "library_600x900.jpg"
STORE_URL = "https://store.steampowered.com/app/{appid}/"


def banner_url(appid: int, cdn_url: str = DEFAULT_CDN_URL) -> str:
    """The vertical library banner of a game on the Steam CDN (or a mirror with the same layout)."""
    return f"{cdn_url.rstrip('/')}/{int(appid)}/{BANNER_FILE}"


def store_url(appid: int) -> str:
    """The game's Steam store page."""
    return STORE_URL.format(appid=int(appid))


def is_ascii_digits(text: str) -> bool:
    """True for "620", False for "", "-1", "6.2" and for Unicode digits such as "²" that int() rejects."""
    return text.isascii() and text.isdigit()
