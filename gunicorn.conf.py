"""gunicorn settings for the service, started by ``python -m serving.launch`` (Procfile, Dockerfile, tests).

preload_app: the master loads and checks the index once before forking, so a bad index stops start-up with one
message and the workers share the memory-mapped tables; it also imports torch (when_ready) for them to share.
With INDEX_URL the app is not preloaded: the master binds $PORT at once and each worker fetches the index
(app/boot.py). Environment, checked by serving/launch.py: PORT, WEB_CONCURRENCY, GUNICORN_TIMEOUT, TORCH_THREADS,
MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_, LOG_LEVEL; also HOST and ACCESS_LOG.
"""

import contextlib
import gc
import os

from serving.launch import read_or_exit

ENV = read_or_exit()
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{ENV['PORT']}"
workers = ENV["WEB_CONCURRENCY"]
worker_class = "serving.worker.BufferedWorker"
preload_app = not os.environ.get("INDEX_URL", "").strip()
timeout = ENV["GUNICORN_TIMEOUT"]  # the first upload per backbone loads its model
graceful_timeout = 30
keepalive = 5
accesslog = ENV["ACCESS_LOG"]  # "-": stdout; None: off
errorlog = "-"
loglevel = ENV["LOG_LEVEL"]
limit_request_line = 8190


def when_ready(server):
    """In the master, before the first fork: import torch, so that the workers share its memory
    (copy-on-write) instead of each importing its own copy on its first model pass. Then the thread that
    forks the workers' image decoders starts here (core/isolated.py): a fork stalls the forking process."""
    import torch  # noqa: F401 - the service never imports torchvision (core/dino/preprocess.py)

    from core.isolated import LAUNCHER
    from serving.dispatch import HEAVY_NICE

    _freeze_heap()
    LAUNCHER.nice = HEAVY_NICE  # decoding is an upload's work: it yields the CPU to lookups too
    LAUNCHER.start()


def post_fork(server, worker):
    """Split the cores between the workers' torch thread pools (TORCH_THREADS overrides); torch's pool
    starts on its first use, in the worker, never in the master (which imported torch in when_ready)."""
    import torch

    from core.cpu import cpu_cores

    threads = ENV["TORCH_THREADS"] or max(1, cpu_cores() // max(1, workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    _limit_malloc_arenas()


def _limit_malloc_arenas() -> None:
    """At most MALLOC_ARENA_MAX glibc arenas, and blocks over MALLOC_MMAP_THRESHOLD_ bytes mapped on their own,
    so that what a forward pass frees goes back to the system instead of staying in a thread's arena. glibc
    reads these variables only at exec: they are applied here, before the worker's threads start."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to limit
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, ENV["MALLOC_ARENA_MAX"])  # -8: M_ARENA_MAX
        threshold = ENV["MALLOC_MMAP_THRESHOLD_"]
        libc.mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD (setting it also stops its dynamic growth)
        libc.mallopt(-1, 2 * threshold)  # -1: M_TRIM_THRESHOLD: free heap tops beyond this go back too


def post_worker_init(worker):
    """PRELOAD_MODELS=ComplexB16,SimpleS16 (or 'all'): load those backbones before serving uploads."""
    from app.params import EXTENSION_KEY

    service = worker.wsgi.extensions.get(EXTENSION_KEY)
    # None: a fetched index is not ready yet (INDEX_URL); app/boot.py preloads once it is
    if service is not None and service.preload:  # checked against the index at start-up
        service.preload_models()
    _freeze_heap()  # the worker's own start-up objects (the app, when not preloaded; the models loaded)


def _freeze_heap() -> None:
    """Leave what this process made so far out of garbage collection: a full collection stalls every request
    in flight, and its writes to object headers turn the pages the workers share into private copies."""
    gc.collect()
    gc.freeze()


# -- Prometheus multiprocess metrics (app/metrics.py): one folder of value files for all workers ------------
# Set here, at import, because preload_app imports the app (and prometheus_client) before any server hook runs.
# An unset PROMETHEUS_MULTIPROC_DIR gets a fresh temporary folder, removed on exit; a given one is wiped.
import glob  # noqa: E402 - with the code it serves

_own_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()  # empty: as unset
if _own_metrics_dir:
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="steam-dino-metrics-")
try:  # a given one may not exist yet (a fresh, ephemeral disk)
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)
except OSError as e:
    import sys

    sys.exit(f"error: cannot start: PROMETHEUS_MULTIPROC_DIR={os.environ['PROMETHEUS_MULTIPROC_DIR']!r}: {e.strerror}")
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
