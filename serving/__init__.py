"""How the service is served: a gunicorn worker class that reads whole requests before the app sees them.

``serving.worker.BufferedWorker`` (gunicorn.conf.py's ``worker_class``) runs one event loop per
process: it accepts connections and reads each request's headers and body without blocking, under
total deadlines; ``serving.dispatch`` then runs it, inline when light (lookups), in a small bounded
pool of low-priority threads when heavy (model passes). ``serving.http1`` finds where a request ends;
``serving.board`` is the table the workers share (who serves, who holds how many connections);
``serving.env`` reads gunicorn's settings. docs/serving.md says why it exists.
"""
