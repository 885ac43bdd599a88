"""Banner folders: ``<appid>.<jpg|jpeg|png|webp>`` files, read the same way by the builder and the service."""

from __future__ import annotations

import re
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # in order of preference for one appid
_BANNER_RE = re.compile(r"^(\d{1,10})\.(jpg|jpeg|png|webp)$", re.IGNORECASE)


def scan_banners(folder: Path) -> dict[int, Path]:
    """appid -> banner file of every banner in the folder (none for an absent folder), jpg first."""
    found: dict[int, Path] = {}
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        m = _BANNER_RE.match(path.name)
        if m and int(m.group(1)) > 0 and path.is_file():  # appid 0 is no game: an index with it would not load
            appid = int(m.group(1))
            if appid not in found or rank[path.suffix.lower()] < rank[found[appid].suffix.lower()]:
                found[appid] = path
    return found


def find_banner_file(folder: Path, appid: int) -> Path | None:
    """The banner of one appid in the folder, in the same order of preference as ``scan_banners``."""
    return next((p for ext in IMAGE_EXTENSIONS if (p := folder / f"{appid}{ext}").is_file()), None)
