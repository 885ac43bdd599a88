"""The web command of the Procfile and the Dockerfile: ``python -m serving.launch [gunicorn options]``.

It checks the settings gunicorn reads (serving/env.py), then becomes ``gunicorn -c gunicorn.conf.py
wsgi:app`` (exec: the same process, so the platform's signals reach gunicorn directly). Run it from
the project's folder (the platforms do).
"""

from __future__ import annotations

import os
import sys

from .env import read_or_exit

CONFIG = "gunicorn.conf.py"
APP = "wsgi:app"


def main(argv: list[str] | None = None) -> None:
    read_or_exit()
    options = sys.argv[1:] if argv is None else argv
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "-c", CONFIG, *options, APP])


if __name__ == "__main__":
    main()
