"""Build an index folder from a folder of banners: DINO embeddings and exact top-k neighbour tables.

Interrupted, it resumes from the last finished batch; after new banners, only those are embedded.
Exit codes: 0 done, 1 failed (the message says what became of the previous index), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.index.layout import EMBEDDING_DTYPES
from indexer.cli._common import BAD_INPUT, FAILED, device_problem, error, interrupted
from indexer.sources import SourceError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, required=True, help="folder of <appid>.jpg|jpeg|png|webp banners")
    p.add_argument("--out", type=Path, required=True, help="index folder to write (replaced atomically)")
    p.add_argument(
        "--strategies",
        default="all",
        help="comma-separated strategy names (e.g. ComplexB16,SimpleS16,GemB16,SimpleS16@full), or 'all' "
        "for the eight original ones (default: all)",
    )
    p.add_argument("--k", type=int, default=100, help="neighbours per game in the tables (default: 100)")
    p.add_argument("--apps", type=Path, help='APPS.json: [{"appid": int, "name": str}, ...] (default: names unknown)')
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: 16 on CPU, 256 on CUDA)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--weights",
        action="append",
        default=[],
        metavar="[BACKBONE=]PATH",
        help="an explicit checkpoint instead of $TORCH_HOME/hub/checkpoints; BACKBONE= (S16, S8, B16, B8, S14, "
        "B14, L14) is needed when the strategies use several backbones; repeatable",
    )
    p.add_argument(
        "--dtype", choices=EMBEDDING_DTYPES, default="float16", help="storage type of embeddings (default: float16)"
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="bf16/fp16: weights and activations in that type, CUDA only (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument(
        "--decode",
        choices=("auto", "cpu", "device"),
        default="auto",
        help="where banners are decoded and preprocessed: cpu (Pillow in worker processes, the reference), "
        "device (batched on --device: nvJPEG on CUDA), auto (device on CUDA, else cpu; the default)",
    )
    p.add_argument(
        "--workers", type=int, help="image decoding processes (cpu decoding; default 1 on CPU), or file-reading threads"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: one per core)")
    p.add_argument(
        "--variants",
        default="",
        help="also precompute mirrored/flipped query tables for GET /match/<appid>?mirror=1&flip=1: "
        "mirror, flip or mirror,flip (every combination of those given; default: none)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="embed on a Ray cluster (pip install '.[ray]'): auto, ray://host:10001, or a local instance when "
        "ADDRESS is omitted; --device, --threads (default 1) and --workers (default: one per GPU, else one per "
        "--threads CPUs) are then the model actors'",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def parse_weights(values: list[str], backbone_codes: list[str]) -> dict[str, Path]:
    from core.dino.backbones import BACKBONES

    out: dict[str, Path] = {}
    for value in values:
        code, sep, path = value.partition("=")
        if sep and code in BACKBONES:
            out[code] = Path(path)
        elif len(backbone_codes) == 1:
            out[backbone_codes[0]] = Path(value)
        else:
            raise SourceError(
                f"--weights {value}: the strategies use several backbones ({', '.join(backbone_codes)}); "
                "say which one, e.g. --weights B16=path/to/checkpoint.pth"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if problem := device_problem(args.device):  # answered before the seconds that importing torch takes
        return error(problem, BAD_INPUT)
    from core.apps import AppsInvalid
    from core.dino.strategies import UnknownStrategy, parse_strategies
    from core.dino.weights import WeightsUnavailable
    from core.files import os_error_words
    from core.variants import UnknownVariant, parse_variants
    from indexer.build import BuildConfig, BuildFailed, build_index
    from indexer.cache import BuildLocked

    try:
        strategies = parse_strategies(args.strategies)
        codes = list(dict.fromkeys(s.backbone.code for s in strategies))
        cfg = BuildConfig(
            images=args.images,
            out=args.out,
            strategies=strategies,
            k=args.k,
            apps_file=args.apps,
            batch_size=args.batch_size,
            device=args.device,
            weights=parse_weights(args.weights, codes),
            num_workers=args.workers,
            threads=args.threads,
            dtype=args.dtype,
            precision=args.precision,
            decode=None if args.decode == "auto" else args.decode,
            progress=not args.quiet,
            variants=parse_variants(args.variants),
            ray=args.ray,
        )
        summary = build_index(cfg)
    except (SourceError, AppsInvalid, UnknownStrategy, UnknownVariant, BuildLocked) as e:
        return error(e, BAD_INPUT)
    except WeightsUnavailable as e:
        return error(f"{e} Or pass --weights [BACKBONE=]PATH.", FAILED)
    except BuildFailed as e:
        return error(e, FAILED)
    except OSError as e:  # before anything was written (reading the inputs)
        return error(os_error_words(e), FAILED)
    except KeyboardInterrupt:
        return interrupted("finished batches are kept; run the same command again to resume.")
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    print(summary.line())
    print(summary.breakdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
