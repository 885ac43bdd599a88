"""Decoding an untrusted image in a child process, under a memory cap and a deadline it cannot exceed.

``core.images`` bounds what the header tells; the rest (a decoder's own buffers) is bounded here: a child forked for
the image may grow its address space by ``DECODE_BYTES_PER_PIXEL`` per pixel of the cap (RLIMIT_AS), is killed at
the deadline, and sends the RGB image back through a pipe, a band at a time.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .images import ImageRejected, decode_budget, open_image

BAND_BYTES = 1 << 20  # pixels sent at a time: neither side holds a second copy of the image


def open_image_isolated(
    data: bytes,
    *,
    max_pixels: int,
    timeout: float,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """``open_image(data, ...)`` in a child process: the same image or ``ImageRejected``, which also answers a
    decode that would take more memory or time than allowed."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:
        # only stdio and its pipe: another thread's pipe kept open here would hide that decoder's exit
        os.closerange(3, write_fd)
        os.closerange(write_fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        _decode_in_child(data, write_fd, max_pixels, resize_to)  # never returns
    os.close(write_fd)
    try:
        return _receive(read_fd, time.monotonic() + timeout, timeout)
    finally:
        os.close(read_fd)
        os.kill(pid, signal.SIGKILL)  # finished or over time; its exit (freeing its memory) is not waited for
        threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()


def _decode_in_child(data: bytes, fd: int, max_pixels: int, resize_to) -> None:
    """Decode, send the result, exit at once (the parent's atexit handlers and buffers are not ours)."""
    status = 1
    try:
        warnings.simplefilter("ignore")  # stderr is the server's log: a refused file is the parent's one line
        Image.MAX_IMAGE_PIXELS = None  # this process applies the caller's cap, exactly (WebP's: from its header)
        budget, rule = decode_budget(max_pixels)
        mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (mapped + budget, mapped + budget))
        image = None
        try:
            image = open_image(data, max_pixels=max_pixels, resize_to=resize_to)
            head = {"size": image.size, "source_size": image.info["source_size"]}
        except ImageRejected as e:
            head = {"code": e.code, "message": e.message}
        except MemoryError:
            head = {
                "code": "too_many_pixels",
                "message": f"decoding this image takes more than {budget / 1e6:,.0f} MB, the limit ({rule})",
            }
        encoded = json.dumps(head).encode()
        _write(fd, len(encoded).to_bytes(4, "big") + encoded)
        rows = max(1, BAND_BYTES // (3 * image.width)) if image else 1
        for top in range(0, image.height if image else 0, rows):
            _write(fd, image.crop((0, top, image.width, min(image.height, top + rows))).tobytes())
        status = 0
    except Exception:  # not the file's fault: the log gets the traceback (unbuffered), the client a 400
        os.write(2, traceback.format_exc().encode())
    finally:
        os._exit(status)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _receive(fd: int, deadline: float, timeout: float) -> Image.Image:
    head = json.loads(_read(fd, int.from_bytes(_read(fd, 4, deadline, timeout), "big"), deadline, timeout))
    if "code" in head:
        raise ImageRejected(head["code"], head["message"])
    width, height = head["size"]
    image = Image.new("RGB", (width, height))
    rows = max(1, BAND_BYTES // (3 * width))
    for top in range(0, height, rows):
        band = min(rows, height - top)
        image.paste(Image.frombytes("RGB", (width, band), _read(fd, 3 * width * band, deadline, timeout)), (0, top))
    image.info["source_size"] = tuple(head["source_size"])
    return image


def _read(fd: int, size: int, deadline: float, timeout: float) -> bytes:
    """Exactly ``size`` bytes from the child, before the deadline."""
    parts, got = [], 0
    poll = select.poll()  # not select(): a busy worker's descriptors go past FD_SETSIZE
    poll.register(fd, select.POLLIN)
    while got < size:
        if not poll.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            raise ImageRejected(
                "too_much_decoding_work", f"decoding the image takes longer than {timeout:g} s, the limit"
            )
        part = os.read(fd, min(size - got, BAND_BYTES))
        if not part:  # the child died (a decoder crashed on this file)
            raise ImageRejected("corrupt_image", "the image could not be decoded")
        parts.append(part)
        got += len(part)
    return b"".join(parts)
