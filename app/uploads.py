"""Reading an uploaded image out of a request, and decoding it with every limit enforced up front.

Accepted: ``multipart/form-data`` with a file field ``image``, or a raw body with an ``image/*`` content type.
The serving worker has read the body, under its size cap and deadlines, before the app runs. Decoding
(``core.images.open_image``) runs in a child process with a memory cap and a deadline (``core.isolated``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from flask import request
from PIL import Image

from core.images import image_format
from core.isolated import open_image_isolated

from .config import Settings
from .problems import BadRequest, UnsupportedUpload

UNSUPPORTED = "unsupported_media_type"
ACCEPTED_TYPES = "multipart/form-data with an 'image' file field, or a raw body with an image/* content type"
DECODE_TIMEOUT = 10.0  # seconds (at most UPLOAD_TIMEOUT): ample for an honest decode, short for a decoding bomb


@dataclass
class Upload:
    image: Image.Image
    decode_ms: float
    query: dict  # what the answer's ``query`` says of the upload


def read_upload() -> bytes:
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
    query = {
        "upload": True,
        "width": width,
        "height": height,
        "format": image_format(data) or "unknown",
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return Upload(image, (time.perf_counter() - start) * 1000, query)


def read_url_query() -> str:
    """The ``url`` of a JSON query body ``{"url": "https://..."}``."""
    body = request.get_json(silent=True)
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise BadRequest("bad_url", 'send a JSON object with an http(s) image URL: {"url": "https://..."}')
    return url.strip()
