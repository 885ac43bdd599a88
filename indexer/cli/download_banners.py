"""Download Steam vertical banners for a list of appids: a thin CLI over indexer.download.

    python scripts/download_banners.py --apps APPS.json --out data/banners [--cdn-url URL] [--workers N]

APPS.json from scripts/fetch_catalog.py carries each game's banner path as the store gives it; a plain list of
{"appid", "name"} falls back to the plain path. Without --apps the shipped catalogs/default_games.json is used.
Exit codes: 0 all fetched (404s included), 1 some failed, 2 bad arguments or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.env import is_http_url
from core.steam import ASSETS_URL, setting
from indexer.cli._common import BAD_INPUT, error, interrupted, number

DEFAULT_APPS_FILE = Path(__file__).resolve().parents[2] / "catalogs" / "default_games.json"

MAX_FAILURE_LINES = 20
OPTIONS = ("assets_url", "workers", "timeout", "retries", "backoff", "retry_missing")  # passed on as they are


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="download_banners.py",
        description="Fetch each game's banner (the catalog's path, else steam/apps/<appid>/library_600x900.jpg) "
        "under the store assets' URL into <out>/<appid>.jpg.",
    )
    p.add_argument(
        "--apps", type=Path, help='JSON list of {"appid": int, "name": str} (default: catalogs/default_games.json)'
    )
    p.add_argument("--out", type=Path, default=Path("data/banners"), help="banner folder (default: data/banners)")
    p.add_argument(
        "--cdn-url",
        "--assets-url",
        dest="assets_url",
        default=setting("STEAM_ASSETS_URL", ASSETS_URL),
        help=f"the store assets' base URL (default: $STEAM_ASSETS_URL or {ASSETS_URL})",
    )
    p.add_argument("--workers", type=number(int, 1), default=8, help="parallel downloads (default: 8)")
    p.add_argument(
        "--timeout", type=number(float, 0, above=True), default=15.0, help="connect/read timeout, s (default: 15)"
    )
    p.add_argument("--retries", type=number(int, 0), default=4, help="retries on 429/5xx/network (default: 4)")
    p.add_argument("--backoff", type=number(float, 0), default=1.0, help="backoff base, s (default: 1)")
    p.add_argument("--retry-missing", action="store_true", help="ask again for the 404s recorded in banners.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Check everything before touching the disk, download, print the summary; return the exit code."""
    args = build_parser().parse_args(argv)
    from core.apps import AppsInvalid, load_apps  # after parsing: --help answers at once
    from indexer.download import download_banners

    try:
        apps = load_apps(args.apps if args.apps is not None else DEFAULT_APPS_FILE)
    except AppsInvalid as exc:
        return error(exc, BAD_INPUT)
    if not is_http_url(args.assets_url):
        return error(f"--cdn-url must be an http(s) URL, got {args.assets_url!r}", BAD_INPUT)
    if args.out.exists() and not args.out.is_dir():
        return error(f"--out {args.out} exists and is not a folder", BAD_INPUT)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return error(f"cannot create {args.out}: {exc}", BAD_INPUT)

    try:
        options = {name: getattr(args, name) for name in OPTIONS}
        summary = download_banners(apps, args.out, progress=not args.no_progress, **options)
    except KeyboardInterrupt:
        return interrupted("files already written are complete; rerun to resume")

    failed = list(summary.failed.items())
    for appid, reason in failed[:MAX_FAILURE_LINES]:
        print(f"failed: {appid}: {reason}", file=sys.stderr)
    if len(failed) > MAX_FAILURE_LINES:
        print(f"failed: ... and {len(failed) - MAX_FAILURE_LINES} more", file=sys.stderr)
    print(summary.line())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
