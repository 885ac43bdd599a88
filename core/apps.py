"""App lists (``[{"appid": 620, "name": "Portal 2"}, ...]``): a user's APPS.json and an index's ``apps.json`` are
checked by the same rules, with the same messages; other keys (the catalog's ``banner``, ``type``...) are kept."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.steam import is_asset_path

TEXT = np.dtypes.StringDType()  # variable-width text in one numpy buffer: no Python object per string


class AppsInvalid(ValueError):
    """An app list is unreadable or not a list of {"appid": int, "name": str}; the message says where."""


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def validate_apps(
    data: Any, where: str = "apps", *, duplicates: Literal["first", "error"] = "first"
) -> list[dict[str, Any]]:
    """The checked list of {"appid", "name", ...} (a missing name is ""; other keys are kept). A repeated appid:
    its first entry with ``duplicates="first"`` (a user's list), refused with ``"error"`` (an index's rows)."""
    if not isinstance(data, list):
        raise AppsInvalid(f"{where}: expected a JSON list of {{'appid': int, 'name': str}}, got {_kind(data)}")
    apps: dict[int, dict[str, Any]] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise AppsInvalid(f"{where}: entry {i} is {_kind(entry)}, expected an object with an int 'appid'")
        appid = entry.get("appid")
        if isinstance(appid, bool) or not isinstance(appid, int):
            raise AppsInvalid(f"{where}: entry {i} has no integer 'appid' (got {appid!r:.80})")
        if appid <= 0:
            raise AppsInvalid(f"{where}: entry {i} has a non-positive appid {appid}")
        name = entry.get("name", "")
        if not isinstance(name, str):
            raise AppsInvalid(f"{where}: entry {i} (appid {appid}) has a non-string 'name' ({name!r:.80})")
        if "banner" in entry and not is_asset_path(entry["banner"]):
            raise AppsInvalid(f"{where}: entry {i} (appid {appid}) has a 'banner' that is not a store asset path")
        if appid in apps:
            if duplicates == "error":
                raise AppsInvalid(f"{where}: appid {appid} appears twice")
            continue
        apps[appid] = {**entry, "name": name}
    return list(apps.values())


def load_apps(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and check an APPS.json file before anything is created, so bad input changes nothing."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        why = "no such file" if isinstance(exc, FileNotFoundError) else exc.strerror or exc
        raise AppsInvalid(f"cannot read apps file {path}: {why}") from None
    except UnicodeDecodeError as exc:
        raise AppsInvalid(f"apps file {path} is not UTF-8 text: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AppsInvalid(f"apps file {path} is not valid JSON: {exc}") from None
    return validate_apps(data, str(path))


class AppColumns:
    """A checked app list as columns, in row order: ``appids`` (int64), ``names`` and ``banners`` (the store's
    banner path, "" where none) as numpy text arrays. No per-game Python objects: workers forked after loading
    share the pages, since reading a row writes no reference count. Rows read (and iterate) as dicts."""

    def __init__(self, apps: list[dict[str, Any]]) -> None:
        self.appids = np.array([a["appid"] for a in apps], dtype=np.int64)
        self.names = np.array([a["name"] for a in apps], dtype=TEXT)
        self.banners = np.array([a.get("banner") or "" for a in apps], dtype=TEXT)
        self._order = np.argsort(self.appids, kind="stable")  # for row(): rows need not be sorted by appid

    def __len__(self) -> int:
        return len(self.appids)

    def row(self, appid: int) -> int | None:
        """The row of an appid, or None."""
        i = int(np.searchsorted(self.appids, appid, sorter=self._order))
        row = int(self._order[i]) if i < len(self._order) else -1
        return row if row >= 0 and self.appids[row] == appid else None

    def __getitem__(self, row: int) -> dict[str, Any]:
        entry = {"appid": int(self.appids[row]), "name": str(self.names[row])}
        return entry | ({"banner": str(self.banners[row])} if self.banners[row] else {})
