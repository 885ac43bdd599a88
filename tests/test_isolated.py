"""Decoding in a child process: the same image as in-process, and a deadline and a memory cap that hold."""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hostile_images import bmp_rle8, encode, mpo
from PIL import Image

from core.dino.preprocess import PREPROCESSINGS
from core.images import ImageRejected, open_image
from core.isolated import LAUNCHER, open_image_isolated
from devtools.server import decoders

DINO = PREPROCESSINGS["dino"].pil_resized_size


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees
    return encode(Image.effect_noise((300, 200), 40).convert("RGB"), "JPEG", exif=exif)


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.effect_noise((300, 450), 60).convert("RGB"), "JPEG"),
        encode(Image.new("RGBA", (64, 48), (10, 20, 30, 100)), "PNG"),
        _exif_rotated_jpeg(),
        mpo((2600, 2100)),  # decoded at a reduced scale, then shrunk
    ],
    ids=["banner", "rgba", "exif-rotated", "large-mpo"],
)
def test_the_child_decodes_what_open_image_decodes(data):
    here = open_image(data, resize_to=DINO)
    there = open_image_isolated(data, max_pixels=40_000_000, timeout=30, resize_to=DINO)
    assert there.mode == "RGB" and there.size == here.size
    assert there.info["source_size"] == here.info["source_size"]
    assert np.array_equal(np.asarray(there), np.asarray(here))


def test_a_rejection_comes_back_with_its_code_and_message():
    tiff = encode(Image.new("RGB", (8, 8)), "TIFF")
    with pytest.raises(ImageRejected) as here:
        open_image(tiff)
    with pytest.raises(ImageRejected) as there:
        open_image_isolated(tiff, max_pixels=40_000_000, timeout=30)
    assert (there.value.code, there.value.message) == (here.value.code, here.value.message)


FORKED_WORKER = """
import os, sys
from core.isolated import LAUNCHER, open_image_isolated
LAUNCHER.start()  # as gunicorn's master does, before it forks its workers
data = sys.stdin.buffer.read()
pid = os.fork()
if pid == 0:
    def no_fork():
        raise AssertionError("the worker forked")
    os.fork = no_fork
    print(open_image_isolated(data, max_pixels=40_000_000, timeout=30).size, flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_worker_has_its_decoders_forked_by_the_master():
    """A fork stalls every thread of the forking process: a worker's lookups would wait for each decoder's."""
    banner = encode(Image.effect_noise((300, 450), 60).convert("RGB"), "JPEG")
    out = subprocess.run([sys.executable, "-c", FORKED_WORKER], input=banner, capture_output=True, timeout=60)
    assert out.stdout == b"(300, 450)\n", out


def test_a_decoder_that_cannot_be_forked_is_the_servers_error_not_the_images(monkeypatch):
    def no_fork():
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)  # the launcher's thread runs in this process here
    banner = encode(Image.effect_noise((30, 45), 60).convert("RGB"), "PNG")
    with pytest.raises(OSError, match="cannot fork a decoder"):
        open_image_isolated(banner, max_pixels=40_000_000, timeout=5)
    monkeypatch.undo()
    assert open_image_isolated(banner, max_pixels=40_000_000, timeout=5).size == (30, 45)  # the launcher lives on


def test_the_launcher_lives_on_after_a_failed_fork_for_a_caller_that_is_gone(monkeypatch):
    """No decoder could be forked, and its caller stopped waiting (its worker died or timed out): the launcher
    cannot tell it so, and goes on with the next image."""
    tried = threading.Event()

    def no_fork():
        tried.set()
        raise BlockingIOError(11, "Resource temporarily unavailable")

    LAUNCHER.start()
    monkeypatch.setattr(os, "fork", no_fork)
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the caller is gone
    data_fd = os.memfd_create("image", os.MFD_CLOEXEC)
    try:
        LAUNCHER.launch(pickle.dumps((40_000_000, 5.0, None)), data_fd, write_fd)
    finally:
        os.close(data_fd)
        os.close(write_fd)
    assert tried.wait(5)
    time.sleep(0.2)  # the launcher has answered (or died) by now
    monkeypatch.undo()
    banner = encode(Image.effect_noise((30, 45), 60).convert("RGB"), "PNG")
    assert open_image_isolated(banner, max_pixels=40_000_000, timeout=5).size == (30, 45)


@pytest.mark.slow
def test_a_decode_past_its_deadline_is_stopped_there():
    slow = bmp_rle8(4000, 2000, run=1)  # 8 M runs of one pixel, which Pillow decodes in Python: seconds
    before = decoders(os.getpid())
    start = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        decoding = pool.submit(open_image_isolated, slow, max_pixels=40_000_000, timeout=0.2)
        seen: set[int] = set()
        while not seen and not decoding.done():
            seen = decoders(os.getpid()) - before
        assert len(seen) == 1  # decoding, under its name
        with pytest.raises(ImageRejected) as e:
            decoding.result()
    assert e.value.code == "too_much_decoding_work" and "longer than 0.2 s" in e.value.message
    assert time.monotonic() - start < 1.0
    deadline = time.monotonic() + 1.0
    while decoders(os.getpid()) != before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert decoders(os.getpid()) == before  # the decoder ended at its deadline, not left decoding


@pytest.mark.slow
def test_an_upload_that_decodes_past_the_deadline_gets_a_400(make_client):
    client = make_client(upload_timeout=0.2)  # the decode's deadline is at most UPLOAD_TIMEOUT
    r = client.post("/match", data=bmp_rle8(2000, 2000, run=1), content_type="image/bmp")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "too_much_decoding_work"


def _png_with_text(megabytes: int) -> bytes:
    """A 1x1 PNG whose compressed text chunks Pillow inflates to ``megabytes`` MB as it reads the header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    plain = encode(Image.new("RGB", (1, 1)), "PNG")
    text = zlib.compress(b"a" * 1_000_000, 9)
    return plain[:33] + b"".join(chunk(b"zTXt", b"note%d\0\0" % i + text) for i in range(megabytes)) + plain[33:]


MEMORY_CHECK = """
import sys
from core.images import ImageRejected
from core.isolated import LAUNCHER, open_image_isolated
data = sys.stdin.buffer.read()
try:
    open_image_isolated(data, max_pixels=2_000_000, timeout=30)  # a budget of 10 MB
except ImageRejected as e:
    print(e.code, e.message)
"""


@pytest.mark.slow
def test_a_decode_over_its_memory_budget_is_refused():
    """In a fresh interpreter with the service's malloc settings: the budget is address space the child adds,
    and a process's free heap (which a test session has plenty of) is not added."""
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": "."}
    data = _png_with_text(40)  # 40 MB of text for a 1-pixel image
    assert Image.open(io.BytesIO(data)).size == (1, 1)
    out = subprocess.run([sys.executable, "-c", MEMORY_CHECK], input=data, capture_output=True, env=env, timeout=60)
    assert out.stdout.decode().startswith("too_many_pixels decoding this image takes more than 10 MB"), out
    small = subprocess.run(
        [sys.executable, "-c", MEMORY_CHECK], input=_png_with_text(2), capture_output=True, env=env, timeout=60
    )
    assert small.returncode == 0 and small.stdout == b"", small  # 2 MB of text: within the budget
