"""Fetch the Steam store's catalog into an APPS.json for the downloader and the builder: a thin CLI over
indexer.catalog.

    python scripts/fetch_catalog.py --out APPS.json [--apps LIST] [--since DATE] [--full]

The games: with STEAM_API_KEY every game on the store (GetAppList; on a rerun only those changed since the
previous file), else SteamSpy's partial list, or with --apps only those of LIST; then each one's name, type,
release date and banner path (GetItems). Settings: STEAM_API_KEY, STEAM_API_URL, STEAMSPY_URL.
Exit codes: 0 written, 1 the store failed (rerun to resume), 2 bad arguments or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from core.env import is_http_url
from core.steam import API_URL, STEAMSPY_URL, is_ascii_digits, setting
from indexer.cli._common import BAD_INPUT, FAILED, error, interrupted, number

PARTIAL = (
    "note: this list is PARTIAL: SteamSpy's games only, not every game on the store. "
    "Set STEAM_API_KEY (a free Steam Web API key) for the whole store."
)


def _since(text: str) -> int:
    """A time as unix seconds, from seconds or a YYYY-MM-DD date (UTC)."""
    if is_ascii_digits(text):
        return int(text)
    try:
        return int(datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD or unix seconds, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fetch_catalog.py", description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--out", type=Path, required=True, help="the APPS.json to write")
    p.add_argument("--apps", type=Path, help="only the games of this APPS.json, not the whole store")
    p.add_argument("--since", type=_since, help="with a key: games changed since (default: the previous --out's)")
    p.add_argument("--full", action="store_true", help="ask for every game again, not only what changed")
    p.add_argument("--batch-size", type=number(int, 1), default=100, help="games per GetItems call (default: 100)")
    p.add_argument("--rate", type=number(float, 0, above=True), default=1.0, help="store calls a second (default: 1)")
    p.add_argument(
        "--steamspy-interval", type=number(float, 0), default=60.0, help="seconds between SteamSpy pages (default: 60)"
    )
    p.add_argument("--timeout", type=number(float, 0, above=True), default=30.0, help="per request, s (default: 30)")
    p.add_argument("--retries", type=number(int, 0), default=5, help="retries on 429/5xx/network (default: 5)")
    p.add_argument("--backoff", type=number(float, 0), default=2.0, help="backoff base, s (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _bad_input(args: argparse.Namespace) -> str | None:
    """Why the settings or the output folder cannot be used, checked before any request; None when they can."""
    for name, default in (("STEAM_API_URL", API_URL), ("STEAMSPY_URL", STEAMSPY_URL)):
        if not is_http_url(setting(name, default)):
            return f"{name}={setting(name, default)!r}: expected an http(s) URL"
    if args.out.is_dir():
        return f"--out {args.out} is a folder: give the APPS.json file to write"
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the folder of --out {args.out}: {e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import requests  # after parsing: --help answers at once
    from tqdm import tqdm

    from core.apps import AppsInvalid, load_apps
    from core.http import BodyTooLarge, RetryPolicy
    from indexer.catalog import fetch_catalog
    from indexer.store import StoreClient

    key = setting("STEAM_API_KEY", "") or None
    source = "apps" if args.apps else "steam" if key else "steamspy"
    try:
        apps = load_apps(args.apps) if args.apps else None
    except AppsInvalid as e:
        return error(e, BAD_INPUT)
    if problem := _bad_input(args):  # last: it creates the folder of --out
        return error(problem, BAD_INPUT)

    def shown(e: BaseException) -> str:  # request URLs carry the key: never printed
        text = f"{type(e).__name__}: {e}"
        return text.replace(key, "<STEAM_API_KEY>") if key else text

    def say(e: Exception, failed: int, pause: float) -> None:
        tqdm.write(f"retrying in {pause:.0f} s after {shown(e)}", file=sys.stderr)

    client = StoreClient(
        setting("STEAM_API_URL", API_URL),
        setting("STEAMSPY_URL", STEAMSPY_URL),
        key,
        policy=RetryPolicy(attempts=args.retries + 1, backoff_s=args.backoff, max_retry_after_s=300.0),
        timeout=args.timeout,
        store_interval=1 / args.rate,
        steamspy_interval=args.steamspy_interval,
        on_retry=None if args.no_progress else say,
    )
    if source == "steamspy":
        print(PARTIAL, file=sys.stderr)
    options = {"since": args.since, "full": args.full, "batch": args.batch_size, "progress": not args.no_progress}
    try:
        summary = fetch_catalog(args.out, client, source, apps=apps, **options)
    except AppsInvalid as e:  # the previous catalog, read before anything is written
        return error(f"{e} (--full replaces an --out that is not a catalog)", BAD_INPUT)
    except KeyboardInterrupt:
        return interrupted(f"what arrived is kept in {args.out}.journal; rerun the same command to resume")
    except (requests.RequestException, BodyTooLarge, OSError) as e:
        return error(f"{shown(e)}; what arrived is kept, rerun the same command to resume", FAILED)
    finally:
        client.session.close()
    print(summary.line())
    if source == "steamspy":
        print(PARTIAL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
