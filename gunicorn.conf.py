"""gunicorn settings for the service (used by the Procfile, the Dockerfile and the tests).

Worker class: serving.worker.BufferedWorker (serving/worker.py). Each worker process runs one event
loop that reads whole requests, headers and body, under total deadlines (HEADER_TIMEOUT,
UPLOAD_TIMEOUT) before the app sees them, so slow clients hold no thread; runs lookups inline, as a
sync worker would, with keep-alive and no GIL contention; and runs model passes in a small pool of
lower-priority threads (UPLOAD_CONCURRENCY per worker, then a short queue, then 503 Retry-After).
The workers balance their keep-alive connections through a board in shared memory, which /health
also reads: it answers 200 only when every worker serves. The README's "Serving" section says why.

preload_app: the master loads and checks the index once, before forking, so a bad index stops
start-up with one message, and the memory-mapped tables are shared by all workers. Models are loaded
lazily inside each worker (torch's thread pool must not exist before fork), once per backbone per
worker.

Environment: PORT (default 8000), WEB_CONCURRENCY (workers, default 2), GUNICORN_TIMEOUT (default
120 s). Started by ``python -m serving.launch`` (Procfile, Dockerfile), which checks them first.
"""

import contextlib
import os
import sys

from serving.env import gunicorn_int, or_exit, preload_torch
from serving.refresh import freeze_heap

bind = f"{os.environ.get('HOST', '0.0.0.0')}:{or_exit(gunicorn_int, 'PORT')}"
workers = or_exit(gunicorn_int, "WEB_CONCURRENCY")
worker_class = "serving.worker.BufferedWorker"
# Deploy (issue 11): with INDEX_URL the index is fetched after the port is bound, in each worker (app/boot.py),
# so the app is not preloaded: the master binds $PORT at once and never imports the app.
preload_app = not os.environ.get("INDEX_URL", "").strip()
timeout = or_exit(gunicorn_int, "GUNICORN_TIMEOUT")  # the first upload per backbone loads its model
graceful_timeout = 30
keepalive = 5
accesslog = os.environ.get("ACCESS_LOG") or None  # "-" for stdout
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info")
limit_request_line = 8190


def post_fork(server, worker):
    """Split the cores between the workers' torch thread pools (TORCH_THREADS overrides).

    Done here, in the worker, because torch's thread pool must not be started
    in the master before the fork; the app itself leaves the setting alone
    unless TORCH_THREADS is set. torch is normally imported by the master already
    (when_ready); if not, it is not imported here (seconds before the worker could
    answer anything) and reads OMP_NUM_THREADS when it is.
    """
    from core.cpu import cpu_cores

    threads = or_exit(gunicorn_int, "TORCH_THREADS") or max(1, cpu_cores() // max(1, workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
    _limit_malloc_arenas()


def _limit_malloc_arenas() -> None:
    """Deploy (issue 11): at most MALLOC_ARENA_MAX (default 2) glibc malloc arenas in a worker, and blocks
    over 128 KiB always mapped on their own (MALLOC_MMAP_THRESHOLD_, default 131072), so freed ones go back.

    By default each of the worker's threads may get its own arena (up to 8 per core), and an arena keeps
    what an upload's forward pass freed: the memory of a worker would grow with the number of threads that
    ever ran an upload. And glibc raises its mmap threshold after each large block freed (up to 32 MiB), so
    a forward pass's activations end up in the heap, where freeing them returns nothing: 34 MiB per worker
    after the ViT-B/16 uploads of ``bench.memory``. Set here, in the worker before its threads start (the
    variables are read only at exec).
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError, ValueError):  # not glibc: nothing to limit
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, int(os.environ.get("MALLOC_ARENA_MAX") or 2))  # -8: M_ARENA_MAX
        threshold = int(os.environ.get("MALLOC_MMAP_THRESHOLD_") or 131072)
        libc.mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD (setting it also stops its dynamic growth)
        libc.mallopt(-1, 2 * threshold)  # -1: M_TRIM_THRESHOLD: free heap tops beyond this go back too


def when_ready(server):
    """Deploy (issue 11): the workers share torch's memory without /health waiting for its import.

    The import's own memory (~140 MiB of anonymous memory with the CPU build, ~280 MiB with the CUDA one:
    relocated library data, the Python modules) is shared by the workers, copy-on-write, only if they are
    forked after it. ``serving/refresh.py`` imports it in the master once the first workers serve, then
    replaces them one at a time. With INDEX_URL (no preloading: the port is bound and the workers then fetch
    the index, which takes longer than the import) it is imported here, before the first fork. PRELOAD_TORCH=0
    skips it: each worker imports torch on its first model pass.
    """
    if or_exit(preload_torch) and preload_app:
        from serving.refresh import share_torch_after_start

        share_torch_after_start(server)
    elif or_exit(preload_torch):  # INDEX_URL: the workers fetch the index first, so nothing waits on the import
        import torch  # noqa: F401 - the service never imports torchvision (core/dino/preprocess.py)
    freeze_heap()


def post_worker_init(worker):
    """PRELOAD_MODELS=ComplexB16,SimpleS16 (or 'all'): load those backbones before serving uploads."""
    from app.params import EXTENSION_KEY

    service = worker.wsgi.extensions.get(EXTENSION_KEY)
    # None: a fetched index is not ready yet (INDEX_URL); app/boot.py preloads once it is
    if service is not None and service.preload:  # checked against the index at start-up
        service.preload_models()
    freeze_heap()  # the worker's own start-up objects (the app, when not preloaded; the models loaded)


# -- Prometheus multiprocess metrics (app/metrics.py): one folder of value files for all workers ------------
# Set here, at import, because preload_app imports the app (and prometheus_client) before any server hook runs.
# An unset PROMETHEUS_MULTIPROC_DIR gets a fresh temporary folder, removed on exit; a given one is wiped.
import glob  # noqa: E402 - with the code it serves

_own_metrics_dir = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
if _own_metrics_dir:
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="steam-dino-metrics-")
for _stale in glob.glob(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "*.db")):
    os.remove(_stale)


def child_exit(server, worker):
    """A dead worker's live gauges (models loaded) go away with it; its counters stay in the totals."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _own_metrics_dir:
        import shutil

        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
