"""The web command of the Procfile and the Dockerfile: ``python -m serving.launch [gunicorn options]``.

It checks the settings gunicorn itself reads, then becomes ``gunicorn -c gunicorn.conf.py wsgi:app``
(exec: the same process, so the platform's signals reach gunicorn directly). Why not gunicorn
directly: gunicorn parses WEB_CONCURRENCY with ``int()`` as it is imported, before gunicorn.conf.py
can check anything, so ``WEB_CONCURRENCY=abc`` was a traceback; here it is one line, like every
other bad setting. Run it from the project's folder (the platforms do).
"""

from __future__ import annotations

import os
import sys

from .env import check_gunicorn_settings, or_exit

CONFIG = "gunicorn.conf.py"
APP = "wsgi:app"


def gunicorn_argv(options: list[str]) -> list[str]:
    return [sys.executable, "-m", "gunicorn", "-c", CONFIG, *options, APP]


def main(argv: list[str] | None = None) -> None:
    or_exit(check_gunicorn_settings)
    args = gunicorn_argv(sys.argv[1:] if argv is None else argv)
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
