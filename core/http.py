"""Reading HTTP bodies with a size cap and a deadline: the one copy every download in the project uses.

requests' timeouts bound each socket read, not the whole body: a server that
trickles a byte at a time would hold a download forever, and a body larger
than expected would fill memory or the disk. Banners, fallback banners,
checkpoints and indexes all read their bodies through ``iter_body``; the
service's fetches of uploaded URLs (urllib3, pinned to a checked address)
through ``iter_raw_body``, which it wraps.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import requests
import urllib3
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError

from core.files import atomic_file


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
    chunk_size: int = 1 << 16,
    decode_content: bool = True,
) -> Iterator[bytes]:
    """The body of a urllib3 response, as each socket read brings it (at most ``chunk_size`` bytes).

    Unlike ``iter_content``, which waits for whole chunks, a server trickling bytes cannot hold a
    read past the deadline. Raises ``BodyTooLarge`` past ``max_bytes`` (or when Content-Length already
    says so) and ``BodyTooSlow`` after ``deadline`` (a ``time.monotonic()`` value); urllib3's own
    errors pass through.
    """
    declared = declared_length(raw.headers)
    if max_bytes is not None and declared is not None and declared > max_bytes:
        raise BodyTooLarge(f"body too large ({declared} > {max_bytes} bytes)")
    got = 0
    while chunk := raw.read1(chunk_size, decode_content=decode_content):
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
    chunk_size: int = 1 << 16,
) -> Iterator[bytes]:
    """The body of a streamed requests response, chunk by chunk, under ``iter_raw_body``'s limits.

    Errors are requests' (as ``iter_content`` maps them), but for ``BodyTooLarge``: ``requests.Timeout``
    after ``deadline`` and ``requests.ConnectionError`` once ``stop`` is set.
    """
    try:
        for chunk in iter_raw_body(resp.raw, max_bytes=max_bytes, deadline=deadline, chunk_size=chunk_size):
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
    buf = bytearray()
    for chunk in iter_body(resp, **limits):
        buf += chunk
    return bytes(buf)


def download_file(
    url: str,
    dst: Path,
    *,
    timeout: float | tuple[float, float],
    max_bytes: int | None = None,
    max_seconds: float | None = None,
    progress: bool = False,
    session: requests.Session | None = None,
) -> int:
    """Stream url into dst; dst appears (atomically, fsynced) only when the whole body arrived.

    Returns the size in bytes. Raises ``requests.RequestException`` (including
    HTTP error statuses), ``BodyTooLarge`` or ``OSError`` (a short body).
    """
    from tqdm import tqdm

    deadline = time.monotonic() + max_seconds if max_seconds else None
    dst.parent.mkdir(parents=True, exist_ok=True)
    with (session or requests).get(url, stream=True, timeout=timeout) as r:
        r.raise_for_status()
        total = declared_length(r.headers) if not r.headers.get("Content-Encoding") else None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress, leave=False)
        with bar, atomic_file(dst) as f:
            for chunk in iter_body(r, max_bytes=max_bytes, deadline=deadline, chunk_size=1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            size = f.tell()
            if total is not None and size != total:
                raise OSError(f"incomplete download of {url}: {size} of {total} bytes")
    return os.stat(dst).st_size
