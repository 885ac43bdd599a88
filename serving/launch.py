"""The web command of the Procfile and the Dockerfile: ``python -m serving.launch [gunicorn options]``.

It checks gunicorn's settings (serving/env.py), then execs ``gunicorn -c gunicorn.conf.py wsgi:app`` in the
same process, so the platform's signals reach gunicorn. Run it from the project's folder.
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
