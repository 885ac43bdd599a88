"""Images an attacker would send, and the costliest honest image of each accepted format at the pixel cap.

Shared by the decoding tests (test_images.py, test_isolated.py) and the service's (test_hostile_uploads.py).
"""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

EMPTY_SCAN = bytes.fromhex("ffda0008010100000000")  # SOS: 1 component, a DC scan with no entropy-coded data
CAP = 40_000_000  # MAX_IMAGE_PIXELS's default
SQUARE = (6320, 6320)  # 39.9 Mpx
TALL = (1414, 28280)  # 39.99 Mpx at the 20:1 aspect cap: too thin for a reduced-scale decode


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def scan_bomb(side: int = 4000, scans: int = 5000, junk: bytes = b"", junk_first: bool = True) -> bytes:
    """A progressive greyscale JPEG with thousands of empty scans (libjpeg passes over every block each time),
    each preceded by ``junk`` (libjpeg skips bytes before a marker), or all but the first."""
    data = encode(Image.new("L", (side, side), 128), "JPEG", progressive=True, quality=30)
    scans_bytes = (junk + EMPTY_SCAN) * scans
    if not junk_first:
        scans_bytes = scans_bytes[len(junk) :]
    return data[:-2] + scans_bytes + data[-2:]


def junk_before_scans(jpeg: bytes) -> bytes:
    """A JPEG with a junk byte before each of its scans, which libjpeg skips (with a warning to no one)."""
    return jpeg.replace(b"\xff\xda", b"\x00\xff\xda")


def mpo(size: tuple[int, int], progressive: bool = False, scans: int = 0) -> bytes:
    """A two-picture MPO (a JPEG with a multi-picture header), ``scans`` empty scans after a junk byte each in
    its first picture."""
    first = Image.new("L" if scans else "RGB", size, 90)
    data = encode(first, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 16))], progressive=progressive)
    end = data.index(b"\xff\xd9", data.index(b"\xff\xda"))  # the first picture's EOI
    return data[:end] + (b"\x00" + EMPTY_SCAN) * scans + data[end:]


def _riff_chunk(tag: bytes, payload: bytes) -> bytes:
    return tag + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) % 2)


def animated_webp(width: int, height: int, frames: int = 1000) -> bytes:
    """An animated WebP: a ``width`` x ``height`` canvas, ``frames`` opaque red 1x1 frames at its top-left corner."""
    tiny = encode(Image.new("RGBA", (1, 1), (255, 0, 0, 255)), "WEBP", lossless=True)[12:]  # its VP8L chunk

    def u24(v: int) -> bytes:
        return struct.pack("<I", v)[:3]

    vp8x = _riff_chunk(b"VP8X", bytes([0x12, 0, 0, 0]) + u24(width - 1) + u24(height - 1))  # alpha, animation
    anim = _riff_chunk(b"ANIM", b"\xff\xff\xff\xff\0\0")
    anmf = _riff_chunk(b"ANMF", u24(0) * 4 + u24(100) + b"\0" + tiny)  # at 0,0; 1x1; 100 ms
    body = b"WEBP" + vp8x + anim + anmf * frames
    return b"RIFF" + struct.pack("<I", len(body)) + body


def gif_canvas(width: int, height: int, frames: int = 2) -> bytes:
    """A GIF of a few dozen bytes: a ``width`` x ``height`` screen, ``frames`` 1x1 frames, index 0 transparent."""
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"  # 2 global colours
    control = b"\x21\xf9\x04\x01\x0a\x00\x00\x00"  # transparent index 0
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return b"GIF89a" + screen + (control + frame) * frames + b"\x3b"


def bmp_rle8(width: int, height: int, run: int = 255) -> bytes:
    """An 8-bit run-length BMP of runs of ``run`` pixels (Pillow decodes RLE in Python: 1-pixel runs are slow)."""
    row = bytes([run, 1]) * (width // run) + (bytes([width % run, 1]) if width % run else b"") + b"\0\0"
    pixels = row * height + b"\0\1"
    palette = bytes([0, 0, 0, 0, 255, 0, 0, 0]) + b"\0" * 4 * 254
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def apng(size: tuple[int, int]) -> bytes:
    frames = [Image.new("RGBA", size, colour) for colour in ((0, 0, 255, 128), (255, 0, 0, 128))]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def apng_header(width: int, height: int, frames: int = 1000) -> bytes:
    """An APNG that claims a canvas and its frames but carries one pixel of data: enough for a header check."""
    control = struct.pack(">IIIIIHHBB", 0, 1, 1, 0, 0, 1, 10, 0, 0)  # frame 0: 1x1 at 0,0
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
        + _png_chunk(b"acTL", struct.pack(">II", frames, 0))
        + _png_chunk(b"fcTL", control)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 5))
        + _png_chunk(b"IEND", b"")
    )


def worst_of_each_format() -> dict[str, bytes]:
    """The costliest image to decode of each format within the default limits (or refused from its header)."""
    webp_side = int((CAP * 5 // 16) ** 0.5)  # WebP's own cap: 16 bytes per pixel within 5 per pixel of CAP
    return {
        "PNG": encode(Image.new("RGB", TALL, (90, 120, 30)), "PNG"),
        "JPEG": encode(Image.new("RGB", TALL, (90, 120, 30)), "JPEG"),
        "progressive JPEG": encode(Image.new("RGB", SQUARE, (90, 120, 30)), "JPEG", progressive=True),
        "GIF": gif_canvas(*SQUARE),
        "animated WebP": animated_webp(webp_side, webp_side),
        "APNG": apng(SQUARE),
        "BMP RLE": bmp_rle8(*SQUARE),
        "TIFF": encode(Image.new("RGB", SQUARE, (90, 120, 30)), "TIFF", compression="tiff_deflate"),
        "MPO": mpo(TALL),
    }
