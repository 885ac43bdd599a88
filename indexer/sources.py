"""What goes into an index: the banner files of a folder, matched with an optional list of apps.

Images are named ``<appid>.<jpg|jpeg|png|webp>``. With an apps list, the index holds the listed apps that have a
banner (the list gives the names); without one, every banner, with an empty name. Rows are sorted by appid, so that
the same inputs always give the same index.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.banners import scan_banners


class SourceError(ValueError):
    """Bad input (folder, apps list): the build stops before writing anything."""


@dataclass(frozen=True)
class Source:
    appid: int
    name: str
    path: Path


@dataclass
class SourcePlan:
    sources: list[Source]
    missing_images: list[int]  # listed apps without a banner
    unlisted_images: int  # banners of apps not in the list (ignored)
    ignored_files: list[str]  # files that are not <appid>.<ext>
    duplicates: list[str]  # extra files for an appid already seen (another extension)


def plan_sources(images: Path, apps: list[dict] | None) -> SourcePlan:
    if not images.is_dir():
        raise SourceError(f"--images {images}: no such folder")
    folder = scan_banners(images)
    found, ignored, duplicates = folder.found, folder.ignored, folder.duplicates
    if apps is None:
        sources = [Source(a, "", found[a]) for a in sorted(found)]
        return SourcePlan(sources, [], 0, ignored, duplicates)
    names = {a["appid"]: a["name"] for a in apps}
    sources = [Source(a, names[a], found[a]) for a in sorted(names) if a in found]
    missing = sorted(a for a in names if a not in found)
    unlisted = sum(1 for a in found if a not in names)
    return SourcePlan(sources, missing, unlisted, ignored, duplicates)
