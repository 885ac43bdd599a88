"""Where an HTTP/1.1 request ends in a byte buffer, and bad framing refused at once; the rest of the request
(request line, header syntax, smuggling checks) is left to gunicorn's parser, which reads the same bytes later.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from http import HTTPStatus

MAX_HEAD_BYTES = 64 * 1024  # request line and headers
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included
MAX_TRAILERS = 8192

_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


@dataclass(eq=False)
class RequestError(Exception):
    """A request the worker answers itself (bad framing, too large, too slow, overloaded)."""

    status: int
    code: str
    message: str
    retry_after: int | None = None


def error_response(status: int, code: str, message: str, retry_after: int | None = None, page: bool = False) -> bytes:
    """A complete HTTP/1.1 response in the API's error shape (``page``: a small HTML page, for the upload form),
    that closes the connection."""
    if page:
        title = f"{status}: {code.replace('_', ' ')}"
        body = (
            f'<!doctype html><html lang="en"><meta charset="utf-8"><title>{title}</title><h1>{title}</h1>'
            f'<p>{html.escape(message)}</p><p><a href="./">Back to the search</a></p></html>'
        ).encode()
        headers = "Content-Type: text/html; charset=utf-8\r\n"
        headers += "Content-Security-Policy: default-src 'none'; frame-ancestors 'none'\r\n"
    else:
        body = json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()
        headers = "Content-Type: application/json\r\n"
    if retry_after is not None:
        headers += f"Retry-After: {retry_after}\r\n"
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n{headers}"
        f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


_UPLOAD_FORM = re.compile(rb"POST (?:https?://[^/ ]*)?/upload(?:\?[^ ]*)? ")


def is_upload_form(head: bytes) -> bool:
    """Whether a request's head is the home page's upload form (POST /upload), whose errors are pages."""
    return _UPLOAD_FORM.match(head) is not None


@dataclass
class Framing:
    """How the body after a request's headers is delimited: ``length`` bytes, or chunked."""

    chunked: bool
    length: int
    expect_continue: bool


def head_framing(head: bytes) -> Framing:
    """The body framing announced by a request's head; conflicting or malformed framing refused (RFC 9112 6.3).

    ``Expect: 100-continue`` counts from HTTP/1.1 clients only (RFC 9110 10.1.1).
    """
    lengths: list[bytes] = []
    codings: list[bytes] = []
    expect = False
    request_line, *lines = head.split(b"\r\n")
    for line in lines:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"content-length":
            lengths.append(value.strip(b" \t"))
        elif name == b"transfer-encoding":
            codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
        elif name == b"expect":
            expect = value.strip(b" \t").lower() == b"100-continue" and request_line.endswith(b" HTTP/1.1")
    if codings:
        if lengths:
            raise RequestError(400, "bad_framing", "both Content-Length and Transfer-Encoding were sent")
        if codings != [b"chunked"]:
            shown = b", ".join(codings).decode("latin-1")
            raise RequestError(501, "unsupported_transfer_coding", f"transfer coding {shown!r} is not supported")
        return Framing(True, 0, expect)
    if not lengths:
        return Framing(False, 0, expect)
    if len(set(lengths)) > 1 or not lengths[0].isdigit() or len(lengths[0]) > 15:
        shown = b", ".join(lengths).decode("latin-1")[:40]
        raise RequestError(400, "bad_content_length", f"invalid Content-Length {shown!r}")
    return Framing(False, int(lengths[0]), expect)


class ChunkScanner:
    """Walks a chunked body as its bytes arrive, checking the framing (400 at once) and the size (413).

    ``scan(buf)``, called whenever more bytes are in ``buf`` (the request from its first byte), returns the
    index just past the body once the last chunk and the trailers are in, else None. A chunk is passed over
    once all of it is in; until then its size line is read again on each call.
    """

    def __init__(self, start: int, max_bytes: int) -> None:
        self.pos = start  # the next size line (or trailer line) starts here
        self.max_bytes = max_bytes
        self.size = 0  # decoded bytes of the chunks passed over
        self.trailers: int | None = None  # where the trailer section starts, once the last chunk is in

    def scan(self, buf: bytearray) -> int | None:
        while True:
            eol = buf.find(b"\r\n", self.pos)
            if eol < 0:
                if self.trailers is not None and len(buf) - self.trailers > MAX_TRAILERS:
                    raise RequestError(400, "bad_chunked_body", "the trailer section is too long")
                if self.trailers is None and len(buf) - self.pos > MAX_CHUNK_LINE:
                    raise RequestError(400, "bad_chunk_size", "a chunk-size line is too long")
                return None
            if self.trailers is not None:  # header lines up to an empty one
                if eol == self.pos:
                    return eol + 2
                self.pos = eol + 2
                continue
            size = self._size(bytes(buf[self.pos : eol]))
            if size == 0:
                self.pos = self.trailers = eol + 2
                continue
            end = eol + 2 + size
            if len(buf) < end + 2:
                return None
            if buf[end : end + 2] != b"\r\n":
                raise RequestError(400, "bad_chunked_body", "a chunk's data is not followed by CRLF")
            self.pos = end + 2
            self.size += size

    def _size(self, line: bytes) -> int:
        token = line.split(b";", 1)[0].rstrip(b" \t")
        if not _HEX.fullmatch(token):
            shown = token[:20].decode("latin-1")
            raise RequestError(400, "bad_chunk_size", f"invalid chunk size {shown!r} (expected hexadecimal digits)")
        size = int(token, 16)
        if self.size + size > self.max_bytes:
            raise RequestError(413, "too_large", f"the body is larger than the {self.max_bytes} bytes allowed")
        return size
