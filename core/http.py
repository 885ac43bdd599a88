"""HTTP bodies read under a size cap and a deadline, and the one retry loop every download uses.

requests' timeouts bound each socket read, not the whole body: a server trickling a byte at a time would hold a
download forever, and a larger body than expected would fill memory or the disk.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import requests
import urllib3
from urllib3.exceptions import DecodeError, InvalidHeader, ProtocolError, ReadTimeoutError
from urllib3.util.retry import Retry

from core.files import atomic_file

T = TypeVar("T")


class TransientError(requests.RequestException):
    """A failure worth another try (429, 5xx, a malformed answer); ``retry_after``: the seconds the server asked for."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# What a retry can cure: the server's own word (TransientError) and the network's failures.
TRANSIENT = (
    TransientError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to try: ``attempts`` in all; between two, the server's Retry-After (at most
    ``max_retry_after_s``) or a backoff from ``backoff_s`` that doubles, jittered, up to ``max_backoff_s``."""

    attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 60.0

    def pause(self, failed: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failed``-th failed attempt (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        doubling = 2.0 ** min(failed - 1, 60)  # capped: a retry-forever policy never overflows
        return min(self.max_backoff_s, self.backoff_s * doubling) * random.uniform(0.5, 1.0)


def with_retries(
    call: Callable[[], T],
    policy: RetryPolicy,
    *,
    retry_if: Callable[[Exception], bool] = lambda e: isinstance(e, TRANSIENT),
    stop: threading.Event | None = None,
    on_retry: Callable[[Exception, int, float], object] | None = None,
) -> T:
    """``call()``'s result, tried ``policy.attempts`` times while ``retry_if`` accepts the failure; the last one
    propagates, as does one whose pause ``stop`` cuts short. ``on_retry(error, failures, pause)`` tells the user."""
    failed = 0
    while True:
        try:
            return call()
        except Exception as e:
            failed += 1
            if failed >= policy.attempts or not retry_if(e):
                raise
            pause = policy.pause(failed, getattr(e, "retry_after", None))
            if on_retry is not None:
                on_retry(e, failed, pause)
            if (stop or threading.Event()).wait(pause):  # set: cut short
                raise


def check_status(resp: requests.Response) -> None:
    """TransientError for 429 and 5xx (with the server's Retry-After, seconds or a date), ``requests.HTTPError`` for
    other errors."""
    if resp.status_code == 429 or resp.status_code >= 500:
        header = (resp.headers.get("Retry-After") or "").strip()
        try:
            retry_after = float(Retry().parse_retry_after(header)) if header else None
        except InvalidHeader:
            retry_after = None
        raise TransientError(f"HTTP {resp.status_code}", retry_after)
    resp.raise_for_status()


class BodyTooLarge(ValueError):
    """The body is (or says it is) larger than the caller's cap."""


class BodyTooSlow(TimeoutError):
    """The body was still arriving at the caller's deadline."""


def declared_length(headers: Mapping[str, str]) -> int | None:
    """The Content-Length header as an int, or None when absent or not plain ASCII digits."""
    raw = (headers.get("Content-Length") or "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() else None


def iter_raw_body(
    raw: urllib3.BaseHTTPResponse,
    *,
    max_bytes: int | None = None,
    deadline: float | None = None,
    decode_content: bool = True,
) -> Iterator[bytes]:
    """The body of a urllib3 response as each socket read brings it, so a trickle cannot hold a read past the
    deadline (``iter_content`` waits for whole chunks). ``BodyTooLarge`` past ``max_bytes`` (or a Content-Length
    over it), ``BodyTooSlow`` after ``deadline`` (``time.monotonic()``); urllib3's own errors pass through."""
    declared = declared_length(raw.headers)
    if max_bytes is not None and declared is not None and declared > max_bytes:
        raise BodyTooLarge(f"body too large ({declared} > {max_bytes} bytes)")
    got = 0
    while chunk := raw.read1(1 << 16, decode_content=decode_content):
        got += len(chunk)
        if max_bytes is not None and got > max_bytes:
            raise BodyTooLarge(f"body too large (> {max_bytes} bytes)")
        if deadline is not None and time.monotonic() > deadline:
            raise BodyTooSlow("body took too long")
        yield chunk


def iter_body(
    resp: requests.Response,
    *,
    max_bytes: int | None = None,
    deadline: float | None = None,
    stop: threading.Event | None = None,
) -> Iterator[bytes]:
    """A streamed requests response's body under ``iter_raw_body``'s limits, with requests' errors (as
    ``iter_content`` maps them; ``requests.ConnectionError`` once ``stop`` is set) but ``BodyTooLarge``."""
    try:
        for chunk in iter_raw_body(resp.raw, max_bytes=max_bytes, deadline=deadline):
            if stop is not None and stop.is_set():
                raise requests.ConnectionError("interrupted")
            yield chunk
    except BodyTooSlow as e:
        raise requests.Timeout(str(e)) from None
    except ReadTimeoutError as e:
        raise requests.ConnectionError(e) from None
    except ProtocolError as e:
        raise requests.exceptions.ChunkedEncodingError(e) from None
    except DecodeError as e:
        raise requests.exceptions.ContentDecodingError(e) from None


def read_body(resp: requests.Response, **limits) -> bytes:
    """The whole body in memory, under ``iter_body``'s limits."""
    return b"".join(iter_body(resp, **limits))


def download_file(
    url: str,
    dst: Path,
    *,
    timeout: float | tuple[float, float],
    max_bytes: int | None = None,
    max_seconds: float | None = None,
    progress: bool = False,
) -> None:
    """Stream url into dst, which appears (atomically, fsynced) only once the whole body arrived; raises
    ``requests.RequestException`` (``check_status``'s included), ``BodyTooLarge`` or ``OSError`` (a short body)."""
    from tqdm import tqdm

    deadline = time.monotonic() + max_seconds if max_seconds else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    with requests.get(url, stream=True, timeout=timeout) as r:
        check_status(r)
        total = declared_length(r.headers) if not r.headers.get("Content-Encoding") else None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress, leave=False)
        with bar, atomic_file(dst) as f:
            for chunk in iter_body(r, max_bytes=max_bytes, deadline=deadline):
                f.write(chunk)
                bar.update(len(chunk))
            size = f.tell()
            if total is not None and size != total:
                raise OSError(f"incomplete download of {url}: {size} of {total} bytes")
