"""Pack an index (all or some of its strategies) into one archive and its sha256, for INDEX_URL deploys.

Writes the archive (``.tar``, or gzip-compressed ``.tar.gz``) and ``<archive>.sha256``: upload the archive anywhere
the dynos can reach, and set ``INDEX_URL`` and ``INDEX_SHA256``.
Exit codes: 0 done, 1 failed (I/O), 2 bad input (no index, unknown strategy, index fails its checks).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from indexer.cli._common import BAD_INPUT, FAILED, error, interrupted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", type=Path, required=True, help="index folder (written by scripts/build_index.py)")
    p.add_argument("--out", type=Path, required=True, help="archive to write (.tar, or .tar.gz to compress)")
    p.add_argument("--strategies", default="all", help="comma-separated strategies to ship, or 'all' (default)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from core.index import IndexInvalid
    from indexer.pack import pack_index

    wanted = None if args.strategies.strip() == "all" else [s.strip() for s in args.strategies.split(",") if s.strip()]
    if wanted == []:
        return error("--strategies: give at least one name, or 'all'", BAD_INPUT)
    try:
        packed = pack_index(args.index, args.out, wanted)
    except IndexInvalid as e:
        return error(e, BAD_INPUT)
    except OSError as e:
        return error(f"cannot write {args.out}: {e}", FAILED)
    except KeyboardInterrupt:
        return interrupted(f"no archive with its .sha256 was completed at {args.out}; run the same command again")
    print(f"{packed.path}: {packed.size / 2**20:.1f} MiB, strategies {', '.join(packed.strategies)}")
    for name, cache in packed.upload_cache.items():  # the README's "What fits a 1 GB dyno" adds these up
        print(f"  uploads on {name} keep {cache} in the page cache")
    print(f"INDEX_SHA256={packed.sha256}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
