"""Reading an uploaded image out of a request, with every limit enforced up front.

Accepted: ``multipart/form-data`` with a file field ``image`` (an HTML form),
or a raw body with an ``image/*`` content type (``curl --data-binary``).
The size cap is Flask's ``MAX_CONTENT_LENGTH``: a declared length over it is
refused (413) before any of the body is read, and a chunked body is cut off
as soon as it passes the cap. Decoding (format whitelist, pixel cap, modes)
is ``app.dino.images.open_image``.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from flask import request
from PIL import Image

from .dino.images import ImageRejected, open_image
from .errors import APIError

ACCEPTED_TYPES = "multipart/form-data with an 'image' file field, or a raw body with an image/* content type"


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


def read_upload_bytes() -> bytes:
    """The raw bytes of the uploaded image; APIError (400/413/415) when the request does not carry one."""
    mimetype = request.mimetype or ""
    if mimetype == "multipart/form-data":
        file = request.files.get("image")
        if file is None:
            fields = sorted({*request.files, *request.form})
            raise APIError(
                400,
                "missing_image",
                f"no file field named 'image' in the form (fields sent: {', '.join(fields) or 'none'})",
            )
        data = file.read()
    elif mimetype.startswith("image/"):
        if mimetype == "image/svg+xml":
            raise APIError(415, "unsupported_media_type", "SVG is not supported; send a JPEG, PNG, WebP, GIF or BMP")
        data = request.get_data(cache=False)
    elif not mimetype:
        raise APIError(415, "unsupported_media_type", f"no Content-Type; send {ACCEPTED_TYPES}")
    else:
        raise APIError(415, "unsupported_media_type", f"Content-Type {mimetype} is not accepted; send {ACCEPTED_TYPES}")
    if not data:
        raise APIError(400, "empty_upload", "the uploaded image is empty")
    return data


def decode_upload(data: bytes, max_pixels: int) -> Upload:
    start = time.perf_counter()
    try:
        image = open_image(data, max_pixels=max_pixels)
    except ImageRejected as e:
        raise APIError(400, e.code, e.message) from None
    decode_ms = (time.perf_counter() - start) * 1000
    fmt = getattr(image, "format", None) or _sniff_format(data)
    return Upload(
        image=image,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        format=fmt,
        width=image.width,
        height=image.height,
        decode_ms=decode_ms,
    )


def _sniff_format(data: bytes) -> str:
    signatures = {b"\xff\xd8": "JPEG", b"\x89PNG": "PNG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WEBP"}
    for magic, name in signatures.items():
        if data.startswith(magic):
            return name
    return "unknown"
