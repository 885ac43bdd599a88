"""The catalog: the store's list of games, then each game's store metadata, into one APPS.json.

APPS.json lists ``{"appid", "name", "type", "release_date", "banner", "last_modified"}``, one game a line in appid
order; games the store does not describe (unknown, delisted) are left out.

- Resumable: each answered page and batch goes to a journal beside the output (``APPS.json.journal``, one
  fsynced JSON line each) before the next request; a killed run replays it and asks only for the rest.
- Incremental (GetAppList only): only the games changed since the previous file's newest ``last_modified`` (or
  ``since``) are asked for, and merged into it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.apps import load_apps
from core.files import Journal, atomic_write_bytes
from indexer.store import ListPage, StoreClient

ITEMS_PER_CALL = 100  # GetItems ids per call: what the store's own pages ask for at once


@dataclass
class CatalogSummary:
    games: int = 0  # in the file written
    listed: int = 0  # in the game list of this run
    gone: int = 0  # listed, but the store does not describe them (unknown, delisted)
    banners: int = 0  # with the store's banner path
    resumed: int = 0  # steps kept from a killed run
    calls: int = 0
    elapsed_s: float = 0.0

    def line(self) -> str:
        resumed = f", {self.resumed} steps resumed" if self.resumed else ""
        return (
            f"catalog: {self.games} games ({self.banners} with the store's banner path); {self.listed} listed, "
            f"{self.gone} not on the store; {self.calls} calls{resumed} in {self.elapsed_s:.1f} s"
        )


def write_catalog(path: Path, catalog: dict[int, dict[str, Any]]) -> None:
    """The catalog as APPS.json, one game a line in appid order, atomically."""
    lines = ",\n".join(json.dumps(catalog[a], ensure_ascii=False) for a in sorted(catalog))
    atomic_write_bytes(path, f"[\n{lines}\n]\n".encode() if catalog else b"[]\n")


def fetch_catalog(
    out: Path,
    client: StoreClient,
    source: str,
    *,
    apps: list[dict[str, Any]] | None = None,
    since: int | None = None,
    full: bool = False,
    batch: int = ITEMS_PER_CALL,
    progress: bool = True,
) -> CatalogSummary:
    """Write ``out``: the games of ``source`` ("apps": the list ``apps``; "steam": GetAppList; "steamspy"), each
    with its GetItems metadata. Raises the client's errors after its retries; the journal keeps what arrived."""
    start = time.monotonic()
    previous = {} if full or source != "steam" or not out.exists() else {a["appid"]: a for a in load_apps(out)}
    if since is None and previous:
        since = max((a.get("last_modified") or 0 for a in previous.values()), default=0) or None
    ids = hashlib.sha256(json.dumps([a["appid"] for a in apps or []]).encode()).hexdigest()[:16]
    journal = Journal(out.with_name(out.name + ".journal"), {"source": source, "since": since, "apps": ids})
    summary = CatalogSummary(resumed=len(journal.records))
    listed: dict[int, list[Any]] = {a["appid"]: [a["appid"], a["name"], None] for a in apps or []}
    entries: dict[int, dict[str, Any] | None] = {}
    cursor: int | None = None if source == "apps" else 0
    for record in journal.records:
        if "list" in record:
            listed.update((a[0], a) for a in record["list"])
            cursor = record["next"]
        else:
            entries.update({a["appid"]: a for a in record["items"]} | dict.fromkeys(record["gone"]))
    try:
        _list(client, source, journal, listed, cursor, since, progress)
        todo = [a for a in listed if a not in entries]
        with tqdm(total=len(listed), initial=len(listed) - len(todo), unit="game", disable=not progress) as bar:
            for i in range(0, len(todo), batch):
                got = client.items(todo[i : i + batch])
                journal.add({"items": [e for e in got.values() if e], "gone": [a for a, e in got.items() if not e]})
                entries.update(got)
                bar.update(len(got))
    finally:
        summary.calls = client.calls
        journal.close()
    catalog = dict(previous)
    for appid, (_, name, modified) in listed.items():
        entry = entries.get(appid)
        if entry is None:
            catalog.pop(appid, None)
            summary.gone += 1
            continue
        catalog[appid] = {**entry, "name": entry["name"] or name}
        if modified is not None:
            catalog[appid]["last_modified"] = modified
    write_catalog(out, catalog)
    journal.close(remove=True)
    summary.games, summary.listed = len(catalog), len(listed)
    summary.banners = sum("banner" in a for a in catalog.values())
    summary.elapsed_s = time.monotonic() - start
    return summary


def _list(
    client: StoreClient,
    source: str,
    journal: Journal,
    listed: dict[int, list[Any]],
    cursor: int | None,
    since: int | None,
    progress: bool,
) -> None:
    """Page through the game list from ``cursor`` (None: complete), journaling each page."""
    with tqdm(desc="game list", unit="page", disable=not progress or cursor is None) as bar:
        while cursor is not None:
            page: ListPage = client.app_list(cursor, since) if source == "steam" else client.steamspy_page(cursor)
            journal.add({"list": page.apps, "next": page.next})
            listed.update((a[0], a) for a in page.apps)
            cursor = page.next
            bar.update(1)
