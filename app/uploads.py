"""Reading an uploaded image out of a request, with every limit enforced up front.

Accepted: ``multipart/form-data`` with a file field ``image`` (an HTML form),
or a raw body with an ``image/*`` content type (``curl --data-binary``).
The size cap is Flask's ``MAX_CONTENT_LENGTH``: a declared length over it is
refused (413) before any of the body is read, and a chunked body is cut off
as soon as it passes the cap. Decoding (format whitelist, pixel cap, modes)
is ``core.images.open_image``, run in a child process with a memory cap and a deadline
(``core.isolated``), for uploads and for images the service fetches alike.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import request
from PIL import Image
from werkzeug.exceptions import RequestEntityTooLarge

from core.images import image_format
from core.isolated import open_image_isolated

from .config import Settings
from .errors import stop_reading
from .problems import BadRequest, TooSlow, UnsupportedUpload

UNSUPPORTED = "unsupported_media_type"
ACCEPTED_TYPES = "multipart/form-data with an 'image' file field, or a raw body with an image/* content type"
DECODE_TIMEOUT = 10.0  # seconds (at most UPLOAD_TIMEOUT): about 10x the slowest honest decode on idle cores here


@dataclass
class Upload:
    image: Image.Image
    size_bytes: int
    sha256: str
    format: str
    width: int
    height: int
    decode_ms: float

    def describe(self) -> dict:
        return {
            "upload": True,
            "width": self.width,
            "height": self.height,
            "format": self.format,
            "bytes": self.size_bytes,
            "sha256": self.sha256,
        }


def buffer_body(max_bytes: int, total_timeout: float, read_timeout: float) -> None:
    """Read the request body into memory now, with deadlines, so a slow client cannot hold a thread.

    Under gunicorn's gthread workers a request's thread reads the body as the
    app consumes it, from a blocking socket with no timeout: a client that
    trickles (or stalls) would keep the thread forever. Here every receive
    has ``read_timeout`` and the whole body ``total_timeout``; past either,
    408. The size cap is enforced while reading (chunked bodies included), and
    a declared Content-Length over it is refused before reading anything.
    """
    environ = request.environ
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise RequestEntityTooLarge()
    sock = environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(read_timeout)
    stream = environ["wsgi.input"]
    body = io.BytesIO()
    deadline = time.monotonic() + total_timeout
    try:
        while True:
            chunk = stream.read(min(65536, max_bytes + 1 - body.tell()) or 1)
            if not chunk:
                break
            body.write(chunk)
            if body.tell() > max_bytes:
                raise RequestEntityTooLarge()
            if time.monotonic() > deadline:
                stop_reading(environ)
                raise TooSlow("upload_timeout", f"the upload took longer than {total_timeout:g} s; try again")
    except TimeoutError:
        stop_reading(environ)
        raise TooSlow("upload_timeout", f"the upload stalled for {read_timeout:g} s; try again") from None
    finally:
        if sock is not None:
            sock.settimeout(previous)
    environ["wsgi.input"] = io.BytesIO(body.getvalue())
    environ["CONTENT_LENGTH"] = str(body.tell())
    environ.pop("HTTP_TRANSFER_ENCODING", None)


def read_upload(settings: Settings) -> bytes:
    """The uploaded image's bytes, read with the configured deadlines and size cap (see ``buffer_body``)."""
    buffer_body(settings.max_upload_bytes, settings.upload_timeout, settings.upload_read_timeout)
    return read_upload_bytes()


def read_upload_bytes() -> bytes:
    """The raw bytes of the uploaded image; a problem (400/413/415) when the request does not carry one."""
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        file = request.files.get("image")
        if file is None:
            fields = sorted({*request.files, *request.form})
            raise BadRequest(
                "missing_image",
                f"no file field named 'image' in the form (fields sent: {', '.join(fields) or 'none'})",
            )
        data = file.read()
    elif mimetype.startswith("image/"):
        if mimetype == "image/svg+xml":
            raise UnsupportedUpload(UNSUPPORTED, "SVG is not supported; send a JPEG, PNG, WebP, GIF or BMP")
        data = request.get_data(cache=False)
    elif not mimetype:
        raise UnsupportedUpload(UNSUPPORTED, f"no Content-Type; send {ACCEPTED_TYPES}")
    else:
        raise UnsupportedUpload(UNSUPPORTED, f"Content-Type {mimetype} is not accepted; send {ACCEPTED_TYPES}")
    if not data:
        raise BadRequest("empty_upload", "the uploaded image is empty")
    return data


def decode_upload(data: bytes, settings: Settings, resize_to: Callable[[int, int], tuple[int, int]]) -> Upload:
    """Decode with the limits of core.images in a child process (``resize_to``: the strategy's resize).

    ``ImageRejected`` (a 400 with its code) also answers a decode over its memory budget or deadline."""
    start = time.perf_counter()
    timeout = min(settings.upload_timeout, DECODE_TIMEOUT)
    image = open_image_isolated(data, max_pixels=settings.max_image_pixels, timeout=timeout, resize_to=resize_to)
    width, height = image.info["source_size"]  # a huge image is decoded reduced
    return Upload(
        image=image,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        format=image_format(data) or "unknown",
        width=width,
        height=height,
        decode_ms=(time.perf_counter() - start) * 1000,
    )


def read_url_query(settings: Settings) -> str:
    """The ``url`` of a JSON query body ``{"url": "https://..."}`` (small: read with the upload deadlines)."""
    buffer_body(64 * 1024, settings.upload_timeout, settings.upload_read_timeout)
    body = request.get_json(silent=True)
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("bad_url", 'send a JSON object with an http(s) image URL: {"url": "https://..."}')
    return url.strip()
