#!/usr/bin/env python3
"""Fail fast, with a clear message, when `make demo` cannot reach what it downloads.

Standard library only: it runs before the virtual environment exists.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

CHECKS = {
    "the Steam Web API (the store's catalog)": "https://api.steampowered.com/",
    "the Steam store assets (banners)": "https://shared.steamstatic.com/store_item_assets/steam/apps/620/library_600x900.jpg",
    "the DINO weights server": "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "the Python package index": "https://pypi.org/simple/",
}


def reachable(url: str, timeout: float = 5.0) -> str | None:
    """None if the host answers (any HTTP status), else why not."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "steam-dino-demo-check"})
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def main() -> int:
    failures = {what: why for what, url in CHECKS.items() if (why := reachable(url)) is not None}
    if not failures:
        return 0
    for what, why in failures.items():
        print(f"error: cannot reach {what}: {why}", file=sys.stderr)
    print(
        "make demo downloads the store's catalog, banners, weights and packages, so it needs internet access.\n"
        "Offline, `make test` runs the whole test suite, and `make serve` serves an index built elsewhere\n"
        "(copy data/index and data/banners here).",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
