"""Banner folders: ``<appid>.<jpg|jpeg|png|webp>`` files, read the same way by the builder and the service."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")  # in order of preference for one appid
_BANNER_RE = re.compile(r"^(\d{1,10})\.(jpg|jpeg|png|webp)$", re.IGNORECASE)


@dataclass
class BannerFolder:
    """appid -> banner path, plus the names of the files that are not banners, or repeat one."""

    found: dict[int, Path] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # not <appid>.<ext> (hidden files are not listed)
    duplicates: list[str] = field(default_factory=list)  # another extension for an appid already seen


def banner_appid(name: str) -> int | None:
    """The appid of a banner file name, or None when the name is not ``<appid>.<ext>``."""
    m = _BANNER_RE.match(name)
    return int(m.group(1)) if m else None


def scan_banners(folder: Path) -> BannerFolder:
    """Every banner in the folder (an absent folder has none); jpg is preferred over the other types."""
    out = BannerFolder()
    if not folder.is_dir():
        return out
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for path in sorted(folder.iterdir()):
        appid = banner_appid(path.name)
        if appid is None or not path.is_file():
            if not path.name.startswith("."):
                out.ignored.append(path.name)
            continue
        if appid in out.found:
            keep, drop = sorted((out.found[appid], path), key=lambda p: rank[p.suffix.lower()])
            out.found[appid] = keep
            out.duplicates.append(drop.name)
        else:
            out.found[appid] = path
    return out


def find_banner_file(folder: Path, appid: int) -> Path | None:
    """The banner of one appid in the folder, in the same order of preference as ``scan_banners``."""
    for ext in IMAGE_EXTENSIONS:
        path = folder / f"{appid}{ext}"
        if path.is_file():
            return path
    return None
