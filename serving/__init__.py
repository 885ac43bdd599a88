"""The gunicorn worker that serves the app (gunicorn.conf.py's ``worker_class``); docs/serving.md says why.

``worker``: one event loop per process that reads whole requests under deadlines and writes the answers;
``dispatch``: runs a request, inline when light, in a bounded pool of low-priority threads when heavy;
``http1``: where a request ends in a buffer; ``board``: the table the workers share; ``env``: gunicorn's
settings; ``launch``: the web command.
"""
