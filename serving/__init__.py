"""The gunicorn worker that serves the app (gunicorn.conf.py's ``worker_class``); docs/serving.md says why."""
