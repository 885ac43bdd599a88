"""Download vertical Steam banners into a folder of `<appid>.jpg` files, from the paths the store gives.

A game's banner is its APPS.json ``banner`` path (``?t=`` token included, as ``scripts/fetch_catalog.py`` writes
it) under the store assets' base URL, else the plain ``steam/apps/<appid>/library_600x900.jpg``. The builder
trusts whatever lies under `<appid>.jpg`, so only complete, decodable images land there (size-capped, checked with
Pillow, written atomically). ``banners.json`` records each banner's path and the paths that answered 404: a rerun
skips both without a request, and fetches again a banner whose path or token changed (art re-uploaded). Each result
also goes to a journal as it arrives, so that a killed run's are kept too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.apps import validate_apps
from core.cpu import pid_alive
from core.files import Journal, atomic_write_bytes, atomic_write_json
from core.http import TRANSIENT, BodyTooLarge, RetryPolicy, TransientError, check_status, read_body, with_retries
from core.steam import ASSETS_URL, banner_asset_url, plain_banner_path

RECORD_FILE = "banners.json"  # {"fetched": {appid: path}, "missing": {appid: path}}
JOURNAL_FILE = "banners.json.journal"  # the results since RECORD_FILE was written: {"fetched"|"missing": [appid, path]}
MAX_BODY_BYTES = 10 * 1024 * 1024
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
USER_AGENT = "steam-dino-banners/0.1 (banner downloader)"
# Temporary names start with a dot and do not end in an image extension, so the index builder never reads them.
_TMP_RE = re.compile(r"^\.(?:\d+\.jpg|banners\.json)\.tmp-(?P<pid>\d+)(?:-\d+)?$")


@dataclass
class DownloadSummary:
    """What a run did, per appid, so that callers (the CLI, tests) can report and decide on an exit code."""

    requested: int = 0
    downloaded: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)  # downloaded again: the store's path or token changed
    skipped: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when nothing failed (404s are an answer, not a failure)."""
        return not self.failed

    def line(self) -> str:
        """The one-line summary printed by the CLI."""
        return (
            f"banners: {self.requested} requested, {len(self.downloaded)} downloaded "
            f"({len(self.changed)} changed in the store), {len(self.skipped)} skipped (unchanged), "
            f"{len(self.missing)} missing (404), {len(self.failed)} failed in {self.elapsed_s:.1f} s"
        )


def banner_paths(apps: Iterable[int | Mapping[str, Any]]) -> dict[int, str]:
    """appid -> the banner's path under the assets' base, each appid once (its first entry): the catalog's path,
    or the plain path for a bare appid or an entry without one. ``AppsInvalid`` for a bad entry."""
    entries = validate_apps([app if isinstance(app, Mapping) else {"appid": app} for app in apps])
    return {app["appid"]: app.get("banner") or plain_banner_path(app["appid"]) for app in entries}


def image_problem(data: bytes) -> str | None:
    """Why `data` is not a usable banner, or None; fully decoded, since `verify()` alone misses truncated JPEGs."""
    if not data:
        return "empty body"
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except UnidentifiedImageError:
        return f"not a valid image (unknown format, starts with {data[:20]!r})"
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return f"not a valid image ({type(exc).__name__}: {exc})"
    if fmt not in ACCEPTED_FORMATS:
        return f"unexpected image format {fmt}"
    return None


def file_is_valid(path: Path) -> bool:
    """Whether an existing banner is complete and decodable (a file cut short by a crash is not)."""
    try:
        return path.stat().st_size <= MAX_BODY_BYTES and image_problem(path.read_bytes()) is None
    except OSError:
        return False


def read_record(out_dir: Path, journaled: list[dict[str, Any]]) -> dict[str, dict[int, str]]:
    """What earlier runs fetched and found missing, per appid (its path): the record, then the ``journaled``
    results since; unreadable: empty (it is a cache, and its paths are only compared with the catalog's)."""
    try:
        data = json.loads((out_dir / RECORD_FILE).read_text(encoding="utf-8"))
        record = {kind: {int(appid): path for appid, path in data[kind].items()} for kind in ("fetched", "missing")}
    except (OSError, ValueError, LookupError, TypeError, AttributeError):
        record = {"fetched": {}, "missing": {}}
    for result in journaled:
        for kind, (appid, path) in result.items():
            record[kind][appid] = path
            if kind == "fetched":
                record["missing"].pop(appid, None)
    return record


def _open_journal(out_dir: Path) -> Journal | None:
    """The journal of this run's results, or None where it cannot be written (a full disk fails the banners too)."""
    try:
        return Journal(out_dir / JOURNAL_FILE, {"record": RECORD_FILE})
    except OSError:
        return None


def clean_stale_temp_files(out_dir: Path) -> None:
    """Remove temporary files left by a killed run (those of a still-running process are left alone)."""
    for path in out_dir.iterdir():
        m = _TMP_RE.match(path.name)
        if m and (int(m["pid"]) == os.getpid() or not pid_alive(int(m["pid"]))):
            with contextlib.suppress(OSError):
                path.unlink()


def download_banners(
    apps: Iterable[int | Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    assets_url: str = ASSETS_URL,
    workers: int = 8,
    timeout: float = 15.0,
    retries: int = 4,
    backoff: float = 1.0,
    max_retry_after: float = 60.0,
    retry_missing: bool = False,
    progress: bool = True,
) -> DownloadSummary:
    """Fetch every app's banner (``banner_paths``) under `assets_url` into `<out_dir>/<appid>.jpg`: a valid file
    from the same path is skipped, a recorded 404 not asked again unless `retry_missing` or the path changed;
    429, 5xx and network errors retried `retries` times (or after the server's Retry-After, up to `max_retry_after`).
    """
    paths = banner_paths(apps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(out)

    start = time.monotonic()
    summary = DownloadSummary(requested=len(paths))
    journal = _open_journal(out)
    record = read_record(out, journal.records if journal else [])
    policy = RetryPolicy(retries + 1, backoff, max_retry_after_s=max_retry_after)
    fetcher = _Fetcher(out, assets_url, timeout, policy, workers, progress)
    todo = {}
    for appid, path in paths.items():
        if record["missing"].get(appid) == path and not retry_missing and not (out / f"{appid}.jpg").exists():
            summary.missing.append(appid)
        else:
            todo[appid] = path
    try:
        fetcher.fetch_all(todo, record, summary, journal)
    finally:
        for session in fetcher.sessions:
            session.close()
        written = False
        with contextlib.suppress(OSError):  # only a cache: at worst the next run asks again
            atomic_write_json(out / RECORD_FILE, {kind: dict(sorted(p.items())) for kind, p in record.items()})
            written = True
        if journal is not None:
            journal.close(remove=written)  # else it keeps this run's results for the next one

    for appids in (summary.downloaded, summary.changed, summary.skipped, summary.missing):
        appids.sort()
    summary.failed = dict(sorted(summary.failed.items()))
    summary.elapsed_s = time.monotonic() - start
    return summary


@dataclass
class _Fetcher:
    """A run's state, shared by its worker threads: settings, one requests.Session per thread, a stop flag."""

    out: Path
    assets_url: str
    timeout: float
    policy: RetryPolicy
    workers: int
    progress: bool
    stop: threading.Event = field(default_factory=threading.Event)
    sessions: list[requests.Session] = field(default_factory=list)
    local: threading.local = field(default_factory=threading.local)

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
            self.local.session.headers["User-Agent"] = USER_AGENT
            self.sessions.append(self.local.session)
        return self.local.session

    def fetch_all(
        self,
        todo: dict[int, str],
        record: dict[str, dict[int, str]],
        summary: DownloadSummary,
        journal: Journal | None,
    ) -> None:
        """Fetch ``todo`` in a thread pool, recording each result as it arrives, in ``record`` and ``journal``."""
        fetched, missing, n = record["fetched"], record["missing"], summary.requested

        def note(kind: str, appid: int) -> None:
            if record[kind].get(appid) == todo[appid]:  # known already (a skipped banner): nothing to journal
                return
            record[kind][appid] = todo[appid]
            if journal is not None:
                with contextlib.suppress(OSError):  # only a cache, as the record is
                    journal.add({kind: [appid, todo[appid]]})

        bar = tqdm(total=n, initial=n - len(todo), unit="banner", disable=not self.progress)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="banner")
        try:
            # A file without a record is taken to come from the plain path; one from another path is stale.
            known = {a: fetched.get(a, plain_banner_path(a)) for a in todo if (self.out / f"{a}.jpg").exists()}
            same = {a for a, p in known.items() if p == todo[a]}
            futures = {pool.submit(self.fetch_one, a, p, a in same): a for a, p in todo.items()}
            for fut in as_completed(futures):
                appid = futures[fut]
                try:
                    status, reason = fut.result()
                except Exception as exc:  # a bug must not lose the other results
                    status, reason = "failed", f"unexpected error: {type(exc).__name__}: {exc}"
                if status in ("downloaded", "skipped"):
                    getattr(summary, status).append(appid)
                    if status == "downloaded" and appid in known and appid not in same:
                        summary.changed.append(appid)
                    missing.pop(appid, None)
                    note("fetched", appid)
                elif status == "missing":
                    summary.missing.append(appid)
                    note("missing", appid)
                elif status != "interrupted":
                    summary.failed[appid] = reason
                bar.update(1)
        except BaseException:
            self.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def fetch_one(self, appid: int, path: str, unchanged: bool) -> tuple[str, str]:
        """One banner end to end: ("downloaded" | "skipped" | "missing" | "failed" | "interrupted", reason)."""
        if self.stop.is_set():
            return "interrupted", ""
        final = self.out / f"{appid}.jpg"
        if unchanged and file_is_valid(final):
            return "skipped", ""
        try:
            url = banner_asset_url(appid, path, self.assets_url)
            body = with_retries(lambda: self._get(url), self.policy, stop=self.stop)
        except TRANSIENT as exc:
            if self.stop.is_set():
                return "interrupted", ""
            reason = str(exc) if isinstance(exc, TransientError) else f"{type(exc).__name__}: {str(exc)[:160]}"
            return "failed", f"{reason} (after {self.policy.attempts} attempts)"
        except requests.HTTPError as exc:  # check_status's: the response is there
            status = exc.response.status_code
            return ("missing", "") if status == 404 else ("failed", f"HTTP {status}")
        except BodyTooLarge:
            return "failed", f"body too large (> {MAX_BODY_BYTES} bytes)"
        except requests.RequestException as exc:
            return "failed", f"request error ({type(exc).__name__}: {str(exc)[:160]})"
        if problem := image_problem(body):
            return "failed", problem
        try:
            atomic_write_bytes(final, body)
        except OSError as exc:
            return "failed", f"cannot write {final}: {exc}"
        return "downloaded", ""

    def _get(self, url: str) -> bytes:
        """One GET of a banner's bytes; raises the errors of ``check_status``, ``read_body`` and requests."""
        with self.session().get(url, stream=True, timeout=(self.timeout, self.timeout)) as resp:
            check_status(resp)
            deadline = time.monotonic() + max(4 * self.timeout, 30.0)  # a slow trickle is cut off too
            return read_body(resp, max_bytes=MAX_BODY_BYTES, deadline=deadline, stop=self.stop)
