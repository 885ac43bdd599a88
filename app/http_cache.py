"""HTTP caching of precomputed answers: an ``ETag``, ``Cache-Control``, and 304s.

Every answer read from the tables is a function of the index build, of the settings that shape answers (the
default strategy, where banner links point), and of the request's resolved parameters (and the base URL, which
appears in banner links), so the tag is ``"<build>-<crc32 of those>"``. A client sending it back in
``If-None-Match`` gets a bodyless 304.
"""

from __future__ import annotations

import hashlib
import zlib

from flask import Response, current_app, request

from core.index import LoadedIndex


def build_id(index: LoadedIndex) -> str:
    """A short id of the index build: its manifest (which holds every file's sha256) hashed."""
    manifest = (index.path / "manifest.json").read_bytes()
    return hashlib.sha256(manifest).hexdigest()[:16]


class HttpCache:
    def __init__(self, build: str, max_age: int, served: str) -> None:
        """``served``: the settings that shape answers, as one string (a restart that changes them changes the tags)."""
        self.build = build
        self.served = served
        self.cache_control = f"public, max-age={max_age}" if max_age else "no-cache"

    def etag(self, *parts: object) -> str:
        key = "|".join(map(str, (self.served, *parts))).encode()
        return f'"{self.build}-{zlib.crc32(key):08x}"'

    def not_modified(self, etag: str) -> Response | None:
        """A 304 when the client already holds this answer: If-None-Match names the tag, or is ``*``, or names the
        tag flask-compress gave the compressed answer (``"<tag>:gzip"``), which is what browsers send back."""
        tag = etag.strip('"')
        compressed = [f"{tag}:{algorithm}" for algorithm in current_app.config["COMPRESS_ALGORITHM"]]
        held = next((t for t in (tag, *compressed) if request.if_none_match.contains_weak(t)), None)
        if held is None:
            return None
        return self.mark(current_app.response_class(status=304), f'"{held}"')

    def mark(self, resp: Response, etag: str) -> Response:
        resp.headers["ETag"] = etag
        resp.headers["Cache-Control"] = self.cache_control
        return resp
