"""The project's gunicorn settings (gunicorn.conf.py, executed as is) for the naive baseline service,
without the worker hook that preloads the real service's models (the baseline has none)."""

from pathlib import Path

exec(compile((Path(__file__).resolve().parent.parent / "gunicorn.conf.py").read_text(), "gunicorn.conf.py", "exec"))


def post_worker_init(worker):  # replaces the real service's hook (it reads the real service)
    pass
