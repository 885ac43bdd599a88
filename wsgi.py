"""The WSGI entry point for gunicorn: ``gunicorn -c gunicorn.conf.py wsgi:app``.

A service that cannot start (bad setting, missing or inconsistent index)
prints one clear line and exits with status 3, instead of a traceback.
"""

from __future__ import annotations

import sys

from app import StartupError, create_app

try:
    app = create_app()
except StartupError as e:
    sys.stderr.write(f"error: cannot start: {e}\n")
    sys.stderr.flush()
    sys.exit(3)
