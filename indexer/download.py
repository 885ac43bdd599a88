"""Download vertical Steam banners (`library_600x900.jpg`) into a folder of `<appid>.jpg` files.

The index builder trusts whatever it finds under `<appid>.<jpg|jpeg|png|webp>`, so this module
guarantees that only complete, decodable images ever land under those names: bodies are buffered
(with a size cap), checked with Pillow, written to a hidden temporary file, fsynced and renamed into
place. Reruns are cheap: valid files are skipped, and appids the CDN answered 404 for are remembered
in `missing.json` so that a rerun does not ask again (unless told to).
"""

from __future__ import annotations

import contextlib
import email.utils
import io
import json
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from core.apps import AppsInvalid
from core.cpu import pid_alive
from core.files import atomic_write_bytes
from core.http import BodyTooLarge, declared_length, read_body
from core.steam import DEFAULT_CDN_URL, banner_url

MISSING_FILE = "missing.json"
MAX_BODY_BYTES = 10 * 1024 * 1024
ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})
USER_AGENT = "steam-dino-banners/0.1 (banner downloader)"
_CHUNK = 64 * 1024
# Temporary names start with a dot and do not end in an image extension, so the index builder never reads them.
_TMP_RE = re.compile(r"^\.(?:\d+\.jpg|missing\.json)\.tmp-(?P<pid>\d+)(?:-\d+)?$")


@dataclass
class DownloadSummary:
    """What a run did, per appid, so that callers (the CLI, tests) can report and decide on an exit code."""

    requested: int = 0
    downloaded: list[int] = field(default_factory=list)
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
            f"banners: {self.requested} requested, {len(self.downloaded)} downloaded, "
            f"{len(self.skipped)} skipped (already there), {len(self.missing)} missing (404), "
            f"{len(self.failed)} failed in {self.elapsed_s:.1f} s"
        )


def unique_appids(apps: Iterable[int | Mapping[str, Any]]) -> list[int]:
    """Appids in first-seen order, each once, so a duplicated entry is fetched a single time."""
    seen: dict[int, None] = {}
    for app in apps:
        appid = app["appid"] if isinstance(app, Mapping) else app
        if isinstance(appid, bool) or not isinstance(appid, int) or appid <= 0:
            raise AppsInvalid(f"not a valid appid: {appid!r}")
        seen.setdefault(appid, None)
    return list(seen)


def image_problem(data: bytes) -> str | None:
    """Why `data` is not a usable banner, or None when it is.

    `verify()` alone misses truncated JPEGs, so the image is also fully decoded (300x450 costs ~1 ms).
    """
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


def file_is_valid(path: Path, max_bytes: int = MAX_BODY_BYTES) -> bool:
    """Whether an existing banner is complete and decodable (a file cut short by a crash is not)."""
    try:
        if path.stat().st_size > max_bytes:
            return False
        return image_problem(path.read_bytes()) is None
    except OSError:
        return False


def read_missing(out_dir: Path) -> set[int]:
    """Appids recorded as 404 by earlier runs; an unreadable file is treated as empty (it is only a cache)."""
    try:
        data = json.loads((out_dir / MISSING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(data, list):
        return set()
    return {x for x in data if isinstance(x, int) and not isinstance(x, bool) and x > 0}


def clean_stale_temp_files(out_dir: Path) -> list[Path]:
    """Remove temporary files left by a killed run (those of a still-running process are left alone)."""
    removed = []
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return removed
    for path in entries:
        m = _TMP_RE.match(path.name)
        if not m:
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid() and pid_alive(pid):
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def download_banners(
    apps: Iterable[int | Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    cdn_url: str = DEFAULT_CDN_URL,
    workers: int = 8,
    timeout: float = 15.0,
    retries: int = 4,
    backoff: float = 1.0,
    max_backoff: float = 30.0,
    max_retry_after: float = 60.0,
    max_bytes: int = MAX_BODY_BYTES,
    retry_missing: bool = False,
    progress: bool = True,
) -> DownloadSummary:
    """Fetch `<cdn_url>/<appid>/library_600x900.jpg` for every appid into `<out_dir>/<appid>.jpg`.

    Existing valid files are skipped; 404s are recorded in `missing.json` and not asked again unless
    `retry_missing`. 429, 5xx, connection errors and timeouts are retried `retries` times with
    exponential backoff (base `backoff` seconds, jittered) or the server's Retry-After (capped).
    """
    if workers < 1:
        raise ValueError("workers must be >= 1")
    if timeout <= 0:
        raise ValueError("timeout must be > 0")
    if retries < 0:
        raise ValueError("retries must be >= 0")
    appids = unique_appids(apps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_files(out)

    start = time.monotonic()
    summary = DownloadSummary(requested=len(appids))
    known_missing = read_missing(out)
    fetcher = _Fetcher(cdn_url, timeout, retries, backoff, max_backoff, max_retry_after, max_bytes)

    todo = []
    for appid in appids:
        if appid in known_missing and not retry_missing and not (out / f"{appid}.jpg").exists():
            summary.missing.append(appid)
        else:
            todo.append(appid)

    new_missing: set[int] = set()
    present: set[int] = set()
    try:
        _fetch_all(fetcher, todo, out, workers, summary, new_missing, present, progress)
    finally:
        fetcher.close()
        _update_missing(out, known_missing, new_missing, present)

    summary.downloaded.sort()
    summary.skipped.sort()
    summary.missing.sort()
    summary.failed = dict(sorted(summary.failed.items()))
    summary.elapsed_s = time.monotonic() - start
    return summary


def _fetch_all(
    fetcher: _Fetcher,
    todo: list[int],
    out: Path,
    workers: int,
    summary: DownloadSummary,
    new_missing: set[int],
    present: set[int],
    progress: bool,
) -> None:
    """Fetch ``todo`` in a thread pool, recording each result as it arrives (an interrupt keeps them)."""
    bar = tqdm(total=summary.requested, initial=summary.requested - len(todo), unit="banner", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="banner")
    try:
        futures = {pool.submit(fetcher.fetch_one, appid, out): appid for appid in todo}
        for fut in as_completed(futures):
            appid = futures[fut]
            try:
                status, reason = fut.result()
            except Exception as exc:  # a bug must not lose the other results
                status, reason = "failed", f"unexpected error: {type(exc).__name__}: {exc}"
            if status in ("downloaded", "skipped"):
                getattr(summary, status).append(appid)
                present.add(appid)
            elif status == "missing":
                summary.missing.append(appid)
                new_missing.add(appid)
            elif status != "interrupted":
                summary.failed[appid] = reason
            bar.update(1)
    except BaseException:
        fetcher.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()


class _Retryable(Exception):
    """A transient failure (429, 5xx, network): worth another attempt after `delay` (None: use backoff)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


class _Fetcher:
    """Per-run state shared by worker threads: settings, one requests.Session per thread, a stop flag."""

    def __init__(
        self,
        cdn_url: str,
        timeout: float,
        retries: int,
        backoff: float,
        max_backoff: float,
        max_retry_after: float,
        max_bytes: int,
    ) -> None:
        self.cdn_url = cdn_url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.max_bytes = max_bytes
        self.stop = threading.Event()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = requests.Session()
            s.headers["User-Agent"] = USER_AGENT
            self._local.session = s
            with self._lock:
                self._sessions.append(s)
        return s

    def close(self) -> None:
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def fetch_one(self, appid: int, out: Path) -> tuple[str, str]:
        """One appid end to end: ("downloaded" | "skipped" | "missing" | "failed" | "interrupted", reason)."""
        if self.stop.is_set():
            return "interrupted", ""
        final = out / f"{appid}.jpg"
        if final.exists() and file_is_valid(final, self.max_bytes):
            return "skipped", ""
        url = banner_url(appid, self.cdn_url)
        attempt = 0
        while True:
            try:
                status, payload = self._attempt(url)
            except _Retryable as exc:
                if attempt >= self.retries:
                    return "failed", f"{exc.reason} (after {attempt + 1} attempts)"
                delay = exc.delay if exc.delay is not None else self._backoff_delay(attempt)
                attempt += 1
                if self.stop.wait(delay):
                    return "interrupted", ""
                continue
            if status != "ok":
                return status, payload if isinstance(payload, str) else ""
            assert isinstance(payload, bytes)
            try:
                atomic_write_bytes(final, payload)
            except OSError as exc:
                return "failed", f"cannot write {final}: {exc}"
            return "downloaded", ""

    def _backoff_delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * (2**attempt)) * random.uniform(0.5, 1.0)

    def _attempt(self, url: str) -> tuple[str, bytes | str]:
        """One GET: ("ok", body) | ("missing", reason) | ("failed", reason); raises _Retryable."""
        try:
            with self.session().get(url, stream=True, timeout=(self.timeout, self.timeout)) as resp:
                code = resp.status_code
                if code == 404:
                    return "missing", "HTTP 404"
                if code == 429 or 500 <= code <= 599:
                    raise _Retryable(f"HTTP {code}", self._retry_after(resp.headers.get("Retry-After")))
                if code != 200:
                    return "failed", f"HTTP {code}"
                declared = declared_length(resp.headers)
                if declared is not None and declared > self.max_bytes:
                    return "failed", f"body too large ({declared} bytes > {self.max_bytes})"
                # a slow trickle is cut off like a read timeout
                deadline = time.monotonic() + max(4 * self.timeout, 30.0)
                body = read_body(resp, max_bytes=self.max_bytes, deadline=deadline, stop=self.stop, chunk_size=_CHUNK)
        except BodyTooLarge:
            return "failed", f"body too large (> {self.max_bytes} bytes)"
        except _Retryable:
            raise
        except requests.Timeout as exc:
            raise _Retryable(f"timeout ({type(exc).__name__})") from exc
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retryable(f"connection error ({type(exc).__name__}: {_short(exc)})") from exc
        except requests.exceptions.ContentDecodingError as exc:
            raise _Retryable(f"bad content encoding ({_short(exc)})") from exc
        except requests.RequestException as exc:
            return "failed", f"request error ({type(exc).__name__}: {_short(exc)})"
        problem = image_problem(body)
        if problem:
            return "failed", problem
        return "ok", body

    def _retry_after(self, value: str | None) -> float | None:
        """Seconds asked for by a Retry-After header (delta or HTTP date), capped; None if absent or unusable."""
        if not value:
            return None
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if seconds != seconds:  # NaN
            return None
        return min(max(seconds, 0.0), self.max_retry_after)


def _update_missing(out: Path, known: set[int], new: set[int], present: set[int]) -> None:
    """Keep missing.json = earlier 404s + this run's, minus what is now on disk; rewrite only on change."""
    updated = (known | new) - present
    if updated == known and (updated or not (out / MISSING_FILE).exists()):
        return
    data = (json.dumps(sorted(updated)) + "\n").encode()
    with contextlib.suppress(OSError):  # only a cache: at worst the next run asks the CDN again
        atomic_write_bytes(out / MISSING_FILE, data)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "MISSING_FILE",
    "AppsInvalid",
    "DownloadSummary",
    "clean_stale_temp_files",
    "download_banners",
    "file_is_valid",
    "image_problem",
    "read_missing",
    "unique_appids",
]
