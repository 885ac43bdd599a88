"""Decoding an untrusted image in a child process, under a memory cap and a deadline it cannot exceed.

``core.images`` bounds what the header tells; the rest (a decoder's own buffers) is bounded here: a child forked for
the image may grow its address space by ``DECODE_BYTES_PER_PIXEL`` per pixel of the cap (RLIMIT_AS), ends itself at
the deadline (SIGALRM), and sends the RGB image back through a pipe, a band at a time.

A fork holds the GIL while the kernel copies the page tables, stalling every other thread of the forking process: a
worker's lookups would wait for each upload's fork. So the children are forked by the launcher, a thread of the
gunicorn master (started in ``when_ready``; the workers send it their images), or of the decoding process itself
where no master started one.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import resource
import select
import signal
import socket
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from .images import ImageRejected, decode_budget, open_image

BAND_BYTES = 1 << 20  # pixels sent at a time: neither side holds a second copy of the image
DECODER_NAME = b"image-decoder"


def open_image_isolated(
    data: bytes,
    *,
    max_pixels: int,
    timeout: float,
    resize_to: Callable[[int, int], tuple[int, int]] | None = None,
) -> Image.Image:
    """``open_image(data, ...)`` in a child process: the same image or ``ImageRejected``, which also answers a
    decode that would take more memory or time than allowed. ``resize_to`` must pickle (a method, a partial)."""
    read_fd, write_fd = os.pipe()
    data_fd = os.memfd_create("image", os.MFD_CLOEXEC)
    try:
        _write(data_fd, data)
        LAUNCHER.launch(pickle.dumps((max_pixels, timeout, resize_to)), data_fd, write_fd)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(data_fd)
        os.close(write_fd)
    try:
        return _receive(read_fd, time.monotonic() + timeout, timeout)
    finally:
        os.close(read_fd)  # a child still writing gets EPIPE and exits; one still decoding ends at its alarm


class Launcher:
    """The thread that forks the decoders, for its process and the processes that process forks later (gunicorn's
    workers). ``nice``: how much lower the decoders' CPU priority is than the process's."""

    def __init__(self) -> None:
        self.nice = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Start the thread, unless this process has it or inherited its socket."""
        with self._lock:
            if self._sock is None:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                threading.Thread(target=_serve, args=(theirs, self.nice), name="decoders", daemon=True).start()
                self._sock = ours

    def launch(self, job: bytes, data_fd: int, out_fd: int) -> None:
        """Have a decoder forked for ``job`` with the image's bytes in ``data_fd``, writing to ``out_fd``."""
        self.start()
        socket.send_fds(self._sock, [job], [data_fd, out_fd])


LAUNCHER = Launcher()


def _serve(sock: socket.socket, nice: int) -> None:
    """The launcher's loop: one decoder forked per job; the ones that ended are reaped at the next job."""
    with contextlib.suppress(OSError):  # Linux: a thread's nice value is its own, and its children's
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    children: set[int] = set()
    while True:
        job, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
        children = {pid for pid in children if not _reaped(pid)}
        try:
            pid = os.fork()
            if pid == 0:
                _decode_in_child(job, *fds)  # never returns
            children.add(pid)
        except OSError as e:  # no memory or no process slot to fork: the server's failure, not the image's
            with contextlib.suppress(OSError):  # a caller that is gone (its worker died or timed out) reads nothing
                _send_head(fds[1], {"error": f"cannot fork a decoder: {e}"})
        finally:
            for fd in fds:
                os.close(fd)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:  # gunicorn's master reaps its every child too
        return True


def _decode_in_child(job: bytes, data_fd: int, fd: int) -> None:
    """Decode, send the result, exit at once (the parent's atexit handlers and buffers are not ours)."""
    status = 1
    try:
        max_pixels, timeout, resize_to = pickle.loads(job)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.setitimer(signal.ITIMER_REAL, timeout)  # the deadline, when the caller stops reading
        with contextlib.suppress(OSError):  # its name in ps, top and the OOM killer's log
            Path("/proc/self/comm").write_bytes(DECODER_NAME)
        data = os.pread(data_fd, os.fstat(data_fd).st_size, 0)
        # only stdio and its pipe: another decoder's pipe kept open here would hide that decoder's exit, and the
        # server's sockets are not ours
        os.closerange(3, fd)
        os.closerange(fd + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
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
        _send_head(fd, head)
        rows = max(1, BAND_BYTES // (3 * image.width)) if image else 1
        for top in range(0, image.height if image else 0, rows):
            _write(fd, image.crop((0, top, image.width, min(image.height, top + rows))).tobytes())
        status = 0
    except Exception:  # not the file's fault: the log gets the traceback (unbuffered), the client a 400
        os.write(2, traceback.format_exc().encode())
    finally:
        os._exit(status)


def _send_head(fd: int, head: dict) -> None:
    encoded = json.dumps(head).encode()
    _write(fd, len(encoded).to_bytes(4, "big") + encoded)


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _receive(fd: int, deadline: float, timeout: float) -> Image.Image:
    head = json.loads(_read(fd, int.from_bytes(_read(fd, 4, deadline, timeout), "big"), deadline, timeout))
    if "error" in head:
        raise OSError(head["error"])
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
