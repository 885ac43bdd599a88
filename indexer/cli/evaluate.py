"""Measure the retrieval quality of an index's strategies without labels: copy detection and agreement.

Exit codes: 0 done, 1 failed (weights unavailable, I/O), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from indexer.cli._common import BAD_INPUT, FAILED, device_problem, error, interrupted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", type=Path, required=True, help="index folder (written by scripts/build_index.py)")
    p.add_argument("--images", type=Path, required=True, help="folder of the banners the index was built from")
    p.add_argument("--strategies", default="all", help="comma-separated strategies of the index, or 'all' (default)")
    p.add_argument("--queries", type=int, default=200, help="banners to alter and search (default: 200)")
    p.add_argument("--k", type=int, default=10, help="depth of recall@k, mAP@k and overlap@k (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of the alterations (default: 0)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables as Markdown to PATH")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, help="altered images per forward pass (default: 16 on CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments that can be checked without the index, or None."""
    if args.queries < 1:
        return f"--queries must be at least 1, got {args.queries}"
    if args.k < 1:
        return f"--k must be at least 1, got {args.k}"
    if args.batch_size is not None and args.batch_size < 1:
        return f"--batch-size must be at least 1, got {args.batch_size}"
    if problem := device_problem(args.device):
        return problem
    if not args.index.is_dir():
        return f"--index {args.index}: no index folder here (build one with scripts/build_index.py)"
    if not args.images.is_dir():
        return f"--images {args.images}: no such folder"
    if args.markdown is not None and not args.markdown.parent.is_dir():
        return f"--markdown {args.markdown}: folder {args.markdown.parent} does not exist"
    if args.markdown is not None and args.markdown.is_dir():
        return f"--markdown {args.markdown} is a folder: give the file to write"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    # Plain mistakes are answered at once, before the seconds that importing torch and the app take.
    problem = check_args(args)
    if problem:
        return error(problem, BAD_INPUT)

    from core.dino.weights import WeightsUnavailable
    from core.files import atomic_write_bytes
    from core.index import IndexInvalid, load_index
    from indexer.evaluation.metrics import EvaluationError, copy_detection, overlap_matrix
    from indexer.evaluation.report import format_table, summary_line, to_markdown

    try:
        names = [n.strip() for n in args.strategies.split(",") if n.strip()]
        index = load_index(args.index)
        overlap = overlap_matrix(index, None if args.strategies.strip() in ("all", "") else names, args.k)
        options = {name: getattr(args, name) for name in ("queries", "k", "seed", "device", "batch_size")}
        detection = copy_detection(index, args.images, overlap.strategies, progress=not args.quiet, **options)
    except (EvaluationError, IndexInvalid) as e:
        return error(e, BAD_INPUT)
    except (WeightsUnavailable, OSError) as e:
        return error(e, FAILED)
    except KeyboardInterrupt:
        return interrupted("nothing was measured or written")
    print(format_table(detection, overlap))
    if args.markdown is not None:
        try:
            atomic_write_bytes(args.markdown, to_markdown(detection, overlap).encode("utf-8"))
        except OSError as e:
            return error(f"--markdown {args.markdown}: {e}", FAILED)
        print(f"wrote {args.markdown}")
    print(summary_line(overlap.strategies, detection, time.monotonic() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
