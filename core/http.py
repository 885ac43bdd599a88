"""Reading HTTP bodies with a size cap and a deadline: the one copy every download in the project uses.

requests' timeouts bound each socket read, not the whole body: a server that
trickles a byte at a time would hold a download forever, and a body larger
than expected would fill memory or the disk. Banners, fallback banners,
checkpoints and indexes all read their bodies through ``iter_body``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError

from core.files import atomic_file


class BodyTooLarge(ValueError):
    """The body is (or says it is) larger than the caller's cap."""


def declared_length(resp: requests.Response) -> int | None:
    """The Content-Length header as an int, or None when absent or not plain ASCII digits."""
    raw = (resp.headers.get("Content-Length") or "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() else None


def iter_body(
    resp: requests.Response,
    *,
    max_bytes: int | None = None,
    deadline: float | None = None,
    stop: threading.Event | None = None,
    chunk_size: int = 1 << 16,
) -> Iterator[bytes]:
    """The body of a streamed response, chunk by chunk.

    Raises ``BodyTooLarge`` past ``max_bytes`` (or when Content-Length already
    says so), ``requests.Timeout`` after ``deadline`` (a ``time.monotonic()``
    value) and ``requests.ConnectionError`` once ``stop`` is set.
    """
    declared = declared_length(resp)
    if max_bytes is not None and declared is not None and declared > max_bytes:
        raise BodyTooLarge(f"body too large ({declared} > {max_bytes} bytes)")
    got = 0
    for chunk in _chunks(resp, chunk_size):
        got += len(chunk)
        if max_bytes is not None and got > max_bytes:
            raise BodyTooLarge(f"body too large (> {max_bytes} bytes)")
        if deadline is not None and time.monotonic() > deadline:
            raise requests.Timeout("body took too long")
        if stop is not None and stop.is_set():
            raise requests.ConnectionError("interrupted")
        yield chunk


def _chunks(resp: requests.Response, chunk_size: int) -> Iterator[bytes]:
    """What each socket read brings, at most chunk_size bytes: unlike ``iter_content``, which waits until a whole
    chunk has arrived, a server trickling bytes cannot hold a read past the deadline. Errors mapped as requests
    maps them in ``iter_content``."""
    raw = resp.raw
    while True:
        try:
            chunk = raw.read1(chunk_size, decode_content=True)
        except ReadTimeoutError as e:
            raise requests.ConnectionError(e) from None
        except ProtocolError as e:
            raise requests.exceptions.ChunkedEncodingError(e) from None
        except DecodeError as e:
            raise requests.exceptions.ContentDecodingError(e) from None
        if not chunk:
            return
        yield chunk


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
        total = declared_length(r) if not r.headers.get("Content-Encoding") else None
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress, leave=False)
        with bar, atomic_file(dst) as f:
            for chunk in iter_body(r, max_bytes=max_bytes, deadline=deadline, chunk_size=1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
            size = f.tell()
            if total is not None and size != total:
                raise OSError(f"incomplete download of {url}: {size} of {total} bytes")
    return os.stat(dst).st_size
