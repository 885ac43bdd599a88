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
120 s).
"""

import os
import sys


def _env_int(name: str, default: int, lo: int = 1) -> int:
    """A whole-number setting; a bad one stops start-up with one line (not a traceback)."""
    raw = os.environ.get(name, "").strip() or str(default)
    if not raw.isascii() or not raw.isdigit() or int(raw) < lo:
        sys.exit(f"error: cannot start: {name}={raw!r}: expected a whole number of at least {lo}")
    return int(raw)


bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_env_int('PORT', 8000)}"
workers = _env_int("WEB_CONCURRENCY", 2)
worker_class = "serving.worker.BufferedWorker"
preload_app = True
timeout = _env_int("GUNICORN_TIMEOUT", 120)  # the first upload per backbone loads its model
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
    unless TORCH_THREADS is set.
    """
    import torch

    from core.dino.extract import cpu_cores

    threads = _env_int("TORCH_THREADS", 0, lo=0) or max(1, cpu_cores() // max(1, workers))
    torch.set_num_threads(threads)


def post_worker_init(worker):
    """PRELOAD_MODELS=ComplexB16,SimpleS16 (or 'all'): load those backbones before serving uploads."""
    from app.params import EXTENSION_KEY

    service = worker.wsgi.extensions[EXTENSION_KEY]
    if service.preload:  # checked against the index at start-up (a name it lacks stops the service)
        service.preload_models()
