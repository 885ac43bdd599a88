"""What goes into an index: the banner files of a folder, matched with an optional list of apps.

Images are named ``<appid>.<jpg|jpeg|png|webp>``. With an apps list, the
index holds the listed apps that have a banner (the list gives the names);
without one, every banner, with an empty name. Rows are sorted by appid, so
that the same inputs always give the same index.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_IMAGE_RE = re.compile(r"^(\d{1,10})\.(jpg|jpeg|png|webp)$", re.IGNORECASE)


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


def load_apps(path: Path) -> list[dict]:
    """An APPS.json list of {"appid": int, "name": str}, validated, with a clear error otherwise."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"--apps {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"--apps {path}: not readable JSON ({e})") from None
    if not isinstance(data, list):
        raise SourceError(f'--apps {path}: expected a list of {{"appid": int, "name": str}}')
    apps: dict[int, str] = {}
    for i, entry in enumerate(data):
        appid = entry.get("appid") if isinstance(entry, dict) else None
        if not isinstance(appid, int) or isinstance(appid, bool) or appid < 0:
            raise SourceError(f"--apps {path}: entry {i} has no non-negative integer appid: {entry!r:.100}")
        name = entry.get("name", "")
        if not isinstance(name, str):
            raise SourceError(f"--apps {path}: entry {i} (appid {appid}) has a non-string name")
        apps.setdefault(appid, name)
    return [{"appid": a, "name": n} for a, n in apps.items()]


def scan_images(folder: Path) -> tuple[dict[int, Path], list[str], list[str]]:
    """appid -> banner path, plus the ignored and duplicate file names (jpg is preferred over other types)."""
    if not folder.is_dir():
        raise SourceError(f"--images {folder}: no such folder")
    found: dict[int, Path] = {}
    ignored, duplicates = [], []
    rank = {ext: i for i, ext in enumerate(IMAGE_EXTENSIONS)}
    for path in sorted(folder.iterdir()):
        m = _IMAGE_RE.match(path.name)
        if not m or not path.is_file():
            if not path.name.startswith("."):
                ignored.append(path.name)
            continue
        appid = int(m.group(1))
        if appid in found:
            keep, drop = sorted((found[appid], path), key=lambda p: rank[p.suffix.lower()])
            found[appid] = keep
            duplicates.append(drop.name)
        else:
            found[appid] = path
    return found, ignored, duplicates


def plan_sources(images: Path, apps: list[dict] | None) -> SourcePlan:
    found, ignored, duplicates = scan_images(images)
    if apps is None:
        sources = [Source(a, "", found[a]) for a in sorted(found)]
        return SourcePlan(sources, [], 0, ignored, duplicates)
    names = {a["appid"]: a["name"] for a in apps}
    sources = [Source(a, names[a], found[a]) for a in sorted(names) if a in found]
    missing = sorted(a for a in names if a not in found)
    unlisted = sum(1 for a in found if a not in names)
    return SourcePlan(sources, missing, unlisted, ignored, duplicates)


def file_sha256(path: Path) -> str:
    """Content hash of a banner: the key of its cached embeddings (a changed banner is re-embedded)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()
