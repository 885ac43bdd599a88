"""Every HTML page in real headless Chromium, at a phone's width and a desktop's: nothing wider than the screen."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from browser import Chromium, find_chromium

WIDTHS = {390: 844, 1280: 900}  # an iPhone 12-15's CSS viewport; a laptop's

# What the page measures, and which elements stick out past the viewport when it overflows.
MEASURE = """JSON.stringify({
  path: location.pathname + location.search,
  type: document.contentType,
  h1: (document.querySelector('h1') || {}).textContent,
  scrollWidth: document.documentElement.scrollWidth,
  innerWidth: window.innerWidth,
  wide: [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .slice(0, 8).map(e => e.tagName + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right)),
})"""


def _pages(base: str) -> dict[str, str]:
    return {
        "home": f"{base}/",
        "search": f"{base}/?q=portal",
        "gallery": f"{base}/render/10",
        "gallery-show-more": f"{base}/render/20?strategy=SimpleS16&k=4",
        "compare": f"{base}/compare/10",
        "random": f"{base}/random",
        "error-unknown-appid": f"{base}/render/999999",
        "error-unknown-url": f"{base}/no/such/page",
    }


@pytest.mark.slow
@pytest.mark.skipif(
    find_chromium() is None and not os.environ.get("REQUIRE_CHROMIUM"),
    reason="Chromium is not installed (.ci/run installs it and sets REQUIRE_CHROMIUM=1)",
)
def test_no_page_is_wider_than_the_screen(server, built_index, tmp_path):
    import json

    shots = Path(os.environ.get("SCREENSHOT_DIR") or tmp_path)
    measured = {}
    with Chromium(tmp_path / "profile") as page:
        for width, height in WIDTHS.items():
            page.viewport(width, height)
            for name, url in _pages(server.url).items():
                page.goto(url)
                measured[width, name] = json.loads(page.evaluate(MEASURE))
                page.screenshot(shots / f"{name}-{width}.png")
            page.goto(server.url + "/")
            page.submit_with_file(".upload form", built_index.banners / "20.jpg", {"strategy": "SimpleS16"})
            measured[width, "upload"] = json.loads(page.evaluate(MEASURE))
            page.screenshot(shots / f"upload-{width}.png")

    for (width, name), m in measured.items():
        assert m["type"] == "text/html", (width, name, m)
        assert m["innerWidth"] == width, (width, name, m)
        assert m["scrollWidth"] <= width, f"{name} at {width} px is {m['scrollWidth']} px wide: {m}"
    # The pages are what they claim: errors as HTML for a browser, the random game's gallery, the upload's.
    assert measured[390, "error-unknown-url"]["h1"].startswith("404")
    assert measured[390, "error-unknown-appid"]["h1"].startswith("404")
    assert measured[390, "random"]["path"].startswith("/render/")
    assert measured[390, "upload"]["h1"] == "Your image"
