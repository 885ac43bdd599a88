"""The project's gunicorn settings (gunicorn.conf.py, executed as is) for the bare baseline, with gunicorn's
sync workers (one request at a time per process, no keep-alive) and without the real service's worker
hooks (torch imported in the master, torch threads, model preloading: the baseline has no model)."""

from pathlib import Path

exec(compile((Path(__file__).resolve().parent.parent / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"))

worker_class = "sync"


def when_ready(server):  # replaces the real service's hook (torch imported before the fork: seconds)
    pass


def post_fork(server, worker):  # replaces the real service's hook (torch threads)
    pass


def post_worker_init(worker):  # replaces the real service's hook (it reads the real service)
    pass
