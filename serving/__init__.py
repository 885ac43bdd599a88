"""How the service is served: a gunicorn worker class that reads whole requests before the app sees them.

``serving.worker.BufferedWorker`` (gunicorn.conf.py's ``worker_class``) runs one event loop per
process: it accepts connections, reads each request's headers and body without blocking, under total
deadlines, and only then runs the application, inline for light requests (lookups) and in a small,
bounded, low-priority thread pool for heavy ones (model passes). ``serving.board`` is the table the
workers share (who is ready, who holds how many connections); ``serving.http1`` finds where a
request ends. The README's "Serving" section says why and what it measured.
"""
