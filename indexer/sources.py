"""What goes into an index: the ``<appid>.<jpg|jpeg|png|webp>`` files of a folder, with an optional apps list.

With a list, the listed apps that have a banner (with the list's names and store banner paths); without one,
every banner, unnamed. Rows are sorted by appid, so the same inputs always give the same index.
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
    banner: str = ""  # the store's banner path (a catalog's "banner"): the service links to it

    def entry(self) -> dict:
        """The index's apps.json row: appid, name and, when the store gave one, the banner path."""
        return {"appid": self.appid, "name": self.name} | ({"banner": self.banner} if self.banner else {})


@dataclass
class SourcePlan:
    sources: list[Source]
    missing_images: list[int]  # listed apps without a banner


def plan_sources(images: Path, apps: list[dict] | None) -> SourcePlan:
    if not images.is_dir():
        raise SourceError(f"--images {images}: no such folder")
    found = scan_banners(images)
    listed = {a: {} for a in found} if apps is None else {a["appid"]: a for a in apps}
    kept = sorted(a for a in listed if a in found)
    sources = [Source(a, listed[a].get("name", ""), found[a], listed[a].get("banner", "")) for a in kept]
    return SourcePlan(sources, sorted(a for a in listed if a not in found))
