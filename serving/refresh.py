"""Serve first, share torch after: the master imports torch once the workers serve, then replaces them.

torch's import costs ~2.6 s and 140-280 MiB of relocated library data and Python modules. Imported in
the master before the workers are forked, that memory is shared by all of them, but ``/health`` waits
for it (issue #11: 5 s to the first 200 on 2 cores, against 2.6 s without). Imported in each worker, the
service is ready sooner but every worker holds its own copy. This does both: the workers are forked
and serve lookups without torch; the master imports it meanwhile (its own process: the workers' GILs
are not involved), then replaces them one at a time with workers forked from it, which share it. Each
new worker serves before an old one is stopped (gunicorn's TTIN, then TTOU, which stops the oldest),
and a stopping worker answers its keep-alive connections' next request with ``Connection: close``
before closing them (``BufferedWorker._drain_and_stop``), so no request is lost and ``/health`` stays
200. ``/health`` reports ``workers_sharing_torch``; an upload that reaches a first-generation worker
imports torch there, as with ``PRELOAD_TORCH=0``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from .worker import BufferedWorker

log = logging.getLogger("gunicorn.error")
IMPORT_NICE = 10  # the import yields the cores to the serving workers (forks come from the main thread: nice 0)
WAIT_SECONDS = 120.0  # for the workers to serve, and for each replacement (a cold start on a busy dyno)


def share_torch_after_start(arbiter) -> threading.Thread:
    """Start the master's thread that imports torch and then refreshes the workers (gunicorn's when_ready)."""
    thread = threading.Thread(target=_run, args=(arbiter,), name="share-torch", daemon=True)
    thread.start()
    return thread


def _run(arbiter) -> None:
    with contextlib.suppress(AttributeError, OSError):  # Linux: a thread's nice value is its own
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), IMPORT_NICE)
    board = BufferedWorker.shared_board()
    if not _wait(lambda: len(board.ready()) >= arbiter.num_workers):
        log.warning("workers not serving after %.0f s: torch stays unshared", WAIT_SECONDS)
        return
    t0 = time.perf_counter()
    import torch  # noqa: F401 - the service never imports torchvision (core/dino/preprocess.py)

    freeze_heap()  # torch's modules too
    log.info(
        "torch imported in the master in %.1f s; replacing the workers so that they share it", time.perf_counter() - t0
    )
    for _ in range(arbiter.num_workers):
        if not _replace_one(arbiter, board):
            log.warning("a worker did not come up within %.0f s: the refresh stops here", WAIT_SECONDS)
            return
    log.info("every worker shares torch (%.1f s after the import began)", time.perf_counter() - t0)


def freeze_heap() -> None:
    """Leave what this process made so far (the app, the catalog's objects, torch's modules) out of garbage
    collection.

    Python's full collections traverse every tracked object: with the catalog and torch imported that is
    hundreds of milliseconds with the worker's GIL held, a stall of every request in flight, and each pass
    writes to the objects' headers, so the copy-on-write pages the workers share become private copies.
    Frozen objects are never traversed (they are never freed either: they live as long as the process).
    """
    gc.collect()
    gc.freeze()


def _replace_one(arbiter, board) -> bool:
    """One more worker (forked now, with torch), serving, then one fewer: gunicorn stops the oldest."""
    before = set(board.sharing_torch())
    wanted = arbiter.num_workers
    os.kill(os.getpid(), signal.SIGTTIN)
    if not _wait(lambda: len(set(board.sharing_torch()) - before) >= 1):
        return False
    os.kill(os.getpid(), signal.SIGTTOU)
    return _wait(lambda: arbiter.num_workers <= wanted and len(board.ready()) >= wanted)


def _wait(condition: Callable[[], bool], seconds: float = WAIT_SECONDS, step: float = 0.05) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True
