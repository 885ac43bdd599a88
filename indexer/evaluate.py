"""Retrieval quality of an index's strategies, measured without any labels.

There is no ground truth of "games whose art looks alike", so two label-free
measurements stand in for one:

1. **Copy detection** (DINO's Copydays evaluation, adapted to banners). A
   seeded sample of the index's banners is altered (crop, JPEG, downscale,
   flip, colour jitter, and a strong combination), each altered copy is
   embedded exactly as the index embeds (the manifest's strategy, the index's
   checkpoint by sha256) and searched among the index's stored embeddings;
   the original banner is the one relevant answer and every other banner a
   distractor. A strategy that cannot find a JPEG of a banner among its
   neighbours will not find that banner's look-alikes either. With one
   relevant item per query, the average precision of a query is 1/rank of
   the original when it is in the top k, else 0, so mAP@k equals the mean
   reciprocal rank at k.
2. **Agreement between strategies**: overlap@k of their precomputed
   neighbour tables, mean over rows of ``|A_k ∩ B_k| / k``. Two strategies
   that agree closely cost the service twice for the same answers; one that
   agrees with none sees something else in the art.

``steam-dino-evaluate`` is the command line; everything here is importable
and takes plain arguments, so tests and notebooks can run single pieces.
"""

from __future__ import annotations

import io
import math
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

from core.banners import scan_banners
from core.dino.extract import Extractor, default_batch_size
from core.dino.strategies import Strategy
from core.dino.weights import ModelCache
from core.files import temp_name
from core.images import ImageRejected, open_image
from core.index import LoadedIndex
from core.knn import ExactSearch

# The alterations, in the order of the report. "strong" chains crop, jitter and JPEG like Copydays' "strong" set.
ALTERATIONS = ("crop", "jpeg", "resize", "flip", "jitter", "strong")
ALL = "all"  # the row that pools every alteration

CROP_AREA = (0.5, 0.9)  # fraction of the area a crop keeps
CROP_ASPECT = (3 / 4, 4 / 3)  # change of the aspect ratio a crop may make (log-uniform)
JPEG_QUALITY = (20, 40)
JITTER = (0.6, 1.4)  # factor range of brightness, contrast and saturation


class EvaluationError(ValueError):
    """Bad input to an evaluation (no such strategy, no banners, a bad count): nothing was measured."""


# ---------------------------------------------------------------------------------------------
# Alterations
# ---------------------------------------------------------------------------------------------


def random_crop(img: Image.Image, rng: random.Random, area: tuple[float, float] = CROP_AREA) -> Image.Image:
    """A crop keeping a random 50-90% of the area, anywhere in the image, aspect ratio changed by at most 4:3.

    Banners are often reframed (store capsules, thumbnails): the crop tests whether a strategy still
    recognises the art when its edges (often the title and the logo) are cut away.
    """
    w, h = img.size
    a = rng.uniform(*area)
    r = math.exp(rng.uniform(math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])))
    fw, fh = math.sqrt(a * r), math.sqrt(a / r)
    if fw > 1.0:  # keep the area when one side would exceed the image
        fw, fh = 1.0, a
    elif fh > 1.0:
        fw, fh = a, 1.0
    cw, ch = max(1, round(w * fw)), max(1, round(h * fh))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return img.crop((x, y, x + cw, y + ch))


def jpeg(img: Image.Image, rng: random.Random, quality: tuple[int, int] = JPEG_QUALITY) -> Image.Image:
    """The image recompressed as a JPEG of quality 20-40: the blocking and colour bleeding of re-uploads."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=rng.randint(*quality))
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def downscale(img: Image.Image, rng: random.Random | None = None) -> Image.Image:
    """Half size and back (bicubic both ways): the detail lost by a thumbnail that was blown up again."""
    w, h = img.size
    small = img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def flip(img: Image.Image, rng: random.Random | None = None) -> Image.Image:
    """The mirror image: DINO's training augmentations include flips, so its features should barely move."""
    return ImageOps.mirror(img)


def colour_jitter(img: Image.Image, rng: random.Random, factors: tuple[float, float] = JITTER) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a random factor in [0.6, 1.4] (a re-graded version)."""
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(*factors))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(*factors))
    return ImageEnhance.Color(img).enhance(rng.uniform(*factors))


def strong(img: Image.Image, rng: random.Random) -> Image.Image:
    """Crop, then colour jitter, then JPEG: several edits at once, as Copydays' "strong" set."""
    return jpeg(colour_jitter(random_crop(img, rng), rng), rng)


_ALTER: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "crop": random_crop,
    "jpeg": jpeg,
    "resize": downscale,
    "flip": flip,
    "jitter": colour_jitter,
    "strong": strong,
}


def alterations(img: Image.Image, rng: random.Random) -> dict[str, Image.Image]:
    """Every alteration of ``img`` (RGB), in ``ALTERATIONS`` order; the same rng state gives the same images.

    The random parameters are drawn from ``rng`` in a fixed order, so that an evaluation is reproducible
    from its seed and every strategy is measured on the very same altered copies.
    """
    img = img.convert("RGB")
    return {name: _ALTER[name](img, rng) for name in ALTERATIONS}


def query_rng(seed: int, appid: int) -> random.Random:
    """The random source of one banner's alterations: depends only on the seed and the appid.

    So a banner gets the same altered copies whatever else is sampled, and runs with more queries
    extend runs with fewer rather than changing them. String seeds are hashed with sha512 by ``random``,
    independently of PYTHONHASHSEED.
    """
    return random.Random(f"evaluate/{seed}/{appid}")


def sample_rows(n: int, queries: int, seed: int) -> list[int]:
    """``min(queries, n)`` distinct rows out of ``n``, seeded, in ascending order."""
    if queries < 1:
        raise EvaluationError(f"--queries must be at least 1, got {queries}")
    rows = np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False)
    return sorted(int(r) for r in rows)


# ---------------------------------------------------------------------------------------------
# Copy detection
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metrics:
    """Recall@1, recall@k and mAP@k (= MRR@k: one relevant item per query) over ``n`` queries."""

    recall_1: float
    recall_k: float
    map_k: float
    n: int


def metrics(ranks: np.ndarray, k: int) -> Metrics:
    """From ranks of the original (1 = first, 0 = not in the top k): AP = 1/rank, or 0 when not found."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        return Metrics(math.nan, math.nan, math.nan, 0)
    found = (ranks >= 1) & (ranks <= k)
    ap = np.where(found, 1.0 / np.maximum(ranks, 1), 0.0)
    return Metrics(float((ranks == 1).mean()), float(found.mean()), float(ap.mean()), int(ranks.size))


@dataclass
class CopyDetection:
    """Ranks of the original banner for every strategy, alteration and query row.

    ``ranks[strategy][alteration]`` is an int array aligned with ``rows``: 1-based rank among the index's
    banners, 0 when the original is not in the top ``k``. ``similarity`` holds the cosine of each altered
    copy with its original's stored embedding (available whatever its rank).
    """

    k: int
    seed: int
    num_items: int  # banners searched (the index's rows)
    rows: list[int]  # query rows, in the order of the arrays
    ranks: dict[str, dict[str, np.ndarray]]
    similarity: dict[str, dict[str, np.ndarray]]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (appid, why) of sampled rows left out
    requested: int = 0  # --queries as asked (more than the index holds: all rows)

    @property
    def strategies(self) -> list[str]:
        return list(self.ranks)

    def metrics(self, strategy: str, alteration: str = ALL) -> Metrics:
        """Metrics of one strategy for one alteration, or over every (query, alteration) pair with ``all``."""
        by_alt = self.ranks[strategy]
        ranks = np.concatenate([by_alt[a] for a in ALTERATIONS]) if alteration == ALL else by_alt[alteration]
        return metrics(ranks, self.k)


def banner_paths(index: LoadedIndex, images_dir: Path) -> dict[int, Path]:
    """appid -> banner file, chosen as the builder chooses (``<appid>.<jpg|jpeg|png|webp>``, jpg first)."""
    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise EvaluationError(f"--images {images_dir}: no such folder")
    return scan_banners(images_dir).found


def check_strategies(index: LoadedIndex, names: Sequence[str] | None) -> list[str]:
    """The names to evaluate: all of the index's strategies for None, else each one checked to be there."""
    available = list(index.strategies)
    if names is None:
        return available
    names = list(dict.fromkeys(names))
    if not names:
        raise EvaluationError(f"no strategy given; this index has {', '.join(available)}")
    unknown = [n for n in names if n not in index.strategies]
    if unknown:
        raise EvaluationError(
            f"strategy {', '.join(map(repr, unknown))} is not in the index {index.path} (it has {', '.join(available)})"
        )
    return names


def make_extractors(
    index: LoadedIndex,
    strategies: Sequence[str],
    *,
    device: str | None = None,
    models: ModelCache | None = None,
    download: bool = True,
) -> list[Extractor]:
    """Extractors that embed exactly as the index did: the manifest's strategies, the recorded checkpoints.

    Strategies of one backbone share an Extractor, hence one forward pass per image (Simple and Complex
    of a backbone cost one). The checkpoint is resolved from ``$TORCH_HOME/hub/checkpoints/`` as the
    service does and must have the sha256 the manifest records (``WeightsUnavailable`` otherwise).
    Models come from ``models`` (a fresh cache by default: an evaluation is a batch job).
    """
    models = models if models is not None else ModelCache()
    # Greedy packing: an Extractor holds one checkpoint per backbone code; a strategy whose recorded
    # sha256 differs from its group's gets its own (and will fail the check with a clear message).
    packs: list[tuple[dict[str, str], list[Strategy]]] = []
    for name in strategies:
        entry = index.strategies[name].entry
        strategy = Strategy.from_manifest(name, entry)
        code, sha = strategy.backbone.code, entry["checkpoint"]["sha256"]
        for shas, members in packs:
            if shas.get(code, sha) == sha:
                shas[code] = sha
                members.append(strategy)
                break
        else:
            packs.append(({code: sha}, [strategy]))
    return [
        Extractor(members, device=device, expected_sha256=shas, models=models, download=download)
        for shas, members in packs
    ]


def embed(extractors: Sequence[Extractor], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """(len(images), dim) float32 features of RGB images for every strategy of the extractors."""
    out: dict[str, np.ndarray] = {}
    for extractor in extractors:
        out.update(extractor.embed_images(images))
    return out


def copy_detection(
    index: LoadedIndex,
    images_dir: str | os.PathLike,
    strategies: Sequence[str] | None = None,
    queries: int = 200,
    k: int = 10,
    seed: int = 0,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    models: ModelCache | None = None,
    extractors: Sequence[Extractor] | None = None,
) -> CopyDetection:
    """Alter a seeded sample of the index's banners, search each copy among the index, rank the original.

    Each sampled banner is decoded once, altered (``alterations``) and every copy embedded for all the
    strategies at once, in batches; each copy is then searched exactly (``ExactSearch``) among the
    stored embeddings. Banners whose file is missing or unreadable are skipped and listed (the index
    may be older than the folder); none left is an ``EvaluationError``. Raises ``WeightsUnavailable``
    before any work when a checkpoint is missing or differs from the index's.
    """
    names = check_strategies(index, strategies)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EvaluationError(f"--k must be a positive integer, got {k!r}")
    if len(index) == 0:
        raise EvaluationError(f"the index {index.path} holds no banners")
    rows = sample_rows(len(index), queries, seed)
    paths = banner_paths(index, Path(images_dir))
    if extractors is None:
        extractors = make_extractors(index, names, device=device, models=models)
    covered = {s.name for e in extractors for s in e.strategies}
    if not set(names) <= covered:
        raise ValueError(f"the extractors do not embed {sorted(set(names) - covered)}")
    batch_size = batch_size or default_batch_size(extractors[0].device.type)
    ranker = _Ranker(index, names, extractors, min(k, len(index)))
    skipped: list[tuple[int, str]] = []
    with tqdm(
        total=len(rows) * len(ALTERATIONS),
        unit="img",
        desc="copy detection",
        disable=not progress,
        file=sys.stderr,
        smoothing=0.1,
    ) as bar:
        for row in rows:
            appid = int(index.appids[row])
            img, why = _open_query(paths.get(appid), appid, images_dir)
            if img is None:
                skipped.append((appid, why))
                bar.total -= len(ALTERATIONS)
                bar.refresh()
                continue
            ranker.add(row, alterations(img, query_rng(seed, appid)))
            if len(ranker.pending) >= batch_size:
                bar.update(ranker.flush())
        bar.update(ranker.flush())
    if not ranker.rows:
        raise EvaluationError(f"none of the {len(rows)} sampled banners could be read from {images_dir}")
    return ranker.result(seed, skipped, queries)


def _open_query(path: Path | None, appid: int, images_dir: object) -> tuple[Image.Image | None, str]:
    """A sampled banner's image, or None and why it is left out (missing or unreadable file)."""
    if path is None:
        return None, f"no banner {appid}.<jpg|jpeg|png|webp> in {images_dir}"
    try:
        return open_image(path), ""
    except (ImageRejected, OSError) as e:
        return None, f"{path.name}: {e}"


class _Ranker:
    """Embeds altered copies in batches and records the rank of each original among the index."""

    def __init__(self, index: LoadedIndex, names: list[str], extractors: Sequence[Extractor], k: int) -> None:
        self.index, self.names, self.extractors, self.k = index, names, extractors, k
        tables = {n: index.strategies[n] for n in names}
        self.searchers = {n: ExactSearch(t.embeddings, sketch=t.sketch) for n, t in tables.items()}
        self.rows: list[int] = []
        self.pending: list[tuple[int, str, Image.Image]] = []  # (row, alteration, image) waiting for a batch
        self.ranks = {n: {a: [] for a in ALTERATIONS} for n in names}
        self.sims = {n: {a: [] for a in ALTERATIONS} for n in names}

    def add(self, row: int, altered: dict[str, Image.Image]) -> None:
        self.rows.append(row)
        self.pending.extend((row, alt, img) for alt, img in altered.items())

    def flush(self) -> int:
        """Embed and rank what is pending; returns how many copies that was."""
        done = len(self.pending)
        if not done:
            return 0
        feats = embed(self.extractors, [img for _, _, img in self.pending])
        for n in self.names:
            table = self.index.strategies[n].embeddings
            for (row, alt, _), q in zip(self.pending, feats[n], strict=True):
                found, _ = self.searchers[n].search(q, self.k)
                hit = np.flatnonzero(found == row)
                self.ranks[n][alt].append(int(hit[0]) + 1 if hit.size else 0)
                original = np.asarray(table[row], dtype=np.float64)
                self.sims[n][alt].append(float(np.dot(q.astype(np.float64), original)))
        self.pending.clear()
        return done

    def result(self, seed: int, skipped: list[tuple[int, str]], requested: int) -> CopyDetection:
        return CopyDetection(
            k=self.k,
            seed=seed,
            num_items=len(self.index),
            rows=self.rows,
            ranks={n: {a: np.array(v, dtype=np.int64) for a, v in by.items()} for n, by in self.ranks.items()},
            similarity={n: {a: np.array(v) for a, v in by.items()} for n, by in self.sims.items()},
            skipped=skipped,
            requested=requested,
        )


# ---------------------------------------------------------------------------------------------
# Agreement between strategies
# ---------------------------------------------------------------------------------------------


@dataclass
class Overlap:
    """``matrix[i, j]`` = mean over rows of |top-k of strategies[i] ∩ top-k of strategies[j]| / k."""

    strategies: list[str]
    k: int
    matrix: np.ndarray
    requested_k: int = 0


def overlap_at_k(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean over rows of |a[:, :k] ∩ b[:, :k]| / k, for neighbour tables with distinct entries per row.

    Vectorised: in each row of the sorted concatenation every shared neighbour appears exactly twice,
    side by side, so counting equal adjacent entries counts the intersection.
    """
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"tables of {a.shape[0]} and {b.shape[0]} rows")
    if a.shape[0] == 0 or k == 0:
        return math.nan
    both = np.sort(np.concatenate([np.asarray(a[:, :k]), np.asarray(b[:, :k])], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    return float(shared.mean() / k)


def overlap_matrix(index: LoadedIndex, strategies: Sequence[str] | None = None, k: int = 10) -> Overlap:
    """Pairwise overlap@k of the precomputed neighbour tables (symmetric, 1 on the diagonal).

    ``k`` is capped to the narrowest table among ``strategies`` (they may have been built with different
    k); the ``Overlap`` records the k used. Needs no weights: it reads the tables only.
    """
    names = check_strategies(index, strategies)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EvaluationError(f"--k must be a positive integer, got {k!r}")
    k_eff = min([k] + [index.strategies[n].k for n in names])
    tables = [index.strategies[n].neighbours for n in names]
    m = np.eye(len(names))
    if k_eff == 0:
        m[:] = math.nan
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = overlap_at_k(tables[i], tables[j], k_eff)
    return Overlap(names, k_eff, m, requested_k=k)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def _sections(detection: CopyDetection | None, overlap: Overlap | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(heading, header, rows) of each table: shared by the plain-text and the Markdown renderings."""
    out = []
    if detection is not None:
        k = detection.k
        heading = (
            f"Copy detection: {len(detection.rows)} banners x {len(ALTERATIONS)} alterations, each copy searched "
            f"among the {detection.num_items} banners of the index (seed {detection.seed}). "
            f"One relevant item per query (the original): AP = 1/rank of the original if it is in the top {k}, "
            f"else 0, so mAP@{k} = MRR@{k}."
        )
        header = ["strategy", "alteration", "R@1", f"R@{k}", f"mAP@{k}", "cos", "n"]
        rows = []
        for s in detection.strategies:
            for i, alt in enumerate((ALL, *ALTERATIONS)):
                m = detection.metrics(s, alt)
                sims = detection.similarity[s]
                cos = np.concatenate([sims[a] for a in ALTERATIONS]) if alt == ALL else sims[alt]
                mean_cos = float(cos.mean()) if cos.size else math.nan
                name = s if i == 0 else ""
                rows.append([name, alt, _fmt(m.recall_1), _fmt(m.recall_k), _fmt(m.map_k), _fmt(mean_cos), str(m.n)])
        out.append((heading, header, rows))
    if overlap is not None:
        capped = f" (capped: the tables hold {overlap.k})" if overlap.requested_k > overlap.k else ""
        heading = (
            f"Agreement: overlap@{overlap.k} of the precomputed neighbour tables, "
            f"mean over rows of |A ∩ B| / {overlap.k}{capped}."
        )
        header = ["", *overlap.strategies]
        rows = [[a] + [_fmt(v) for v in overlap.matrix[i]] for i, a in enumerate(overlap.strategies)]
        out.append((heading, header, rows))
    return out


def _notes(detection: CopyDetection | None) -> list[str]:
    notes = []
    if detection is not None:
        notes.append("cos: mean cosine of the altered copy with its original's stored embedding.")
        if detection.requested > detection.num_items:
            notes.append(f"--queries {detection.requested} > {detection.num_items} banners: every banner was used.")
        for appid, why in detection.skipped:
            notes.append(f"skipped appid {appid}: {why}")
    return notes


def format_table(detection: CopyDetection | None, overlap: Overlap | None) -> str:
    """The report as aligned plain text: text columns left-aligned, numbers right-aligned."""
    blocks = []
    for heading, header, rows in _sections(detection, overlap):
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        numeric = [c > 0 and all(_is_number(r[c]) for r in rows) for c in range(len(header))]

        def line(cells: list[str], widths: list[int] = widths, numeric: list[bool] = numeric) -> str:
            parts = [
                cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(cells, widths, numeric, strict=True)
            ]
            return "  ".join(parts).rstrip()

        rule = "  ".join("-" * w for w in widths)
        blocks.append("\n".join([heading, "", line(header), rule, *(line(r) for r in rows)]))
    notes = _notes(detection)
    if notes:
        blocks.append("\n".join(notes))
    return "\n\n".join(blocks) + "\n"


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return cell == "-"
    return True


def to_markdown(detection: CopyDetection | None, overlap: Overlap | None, title: str = "Retrieval evaluation") -> str:
    """The same tables as ``format_table``, as GitHub Markdown (numbers right-aligned)."""

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    blocks = [f"# {title}"]
    for heading, header, rows in _sections(detection, overlap):
        numeric = [c > 0 and all(_is_number(r[c]) for r in rows) for c in range(len(header))]
        lines = [
            "| " + " | ".join(esc(h) for h in header) + " |",
            "| " + " | ".join("---:" if num else "---" for num in numeric) + " |",
            *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows),
        ]
        blocks.append(heading + "\n\n" + "\n".join(lines))
    notes = _notes(detection)
    if notes:
        blocks.append("\n".join(f"- {esc(n)}" for n in notes))
    return "\n\n".join(blocks) + "\n"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary sibling and ``os.replace``: never a half-written report."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summary_line(strategies: Sequence[str], detection: CopyDetection | None, seconds: float) -> str:
    """The last line of a run: what was measured and how long it took."""
    queries = len(detection.rows) if detection is not None else 0
    strategies_s = f"{len(strategies)} strateg{'y' if len(strategies) == 1 else 'ies'} ({', '.join(strategies)})"
    queries_s = f"{queries} quer{'y' if queries == 1 else 'ies'} x {len(ALTERATIONS)} alterations"
    return f"evaluated {strategies_s} on {queries_s} in {seconds:.1f} s"
