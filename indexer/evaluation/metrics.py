"""What the evaluation measures, without labels: copy detection, and how much the strategies agree.

1. **Copy detection** (DINO's Copydays, on banners): altered copies of a seeded sample of banners are embedded
   as the index embeds them and searched among its stored embeddings; the original is the one relevant answer,
   so mAP@k is the mean reciprocal rank at k.
2. **Agreement**: overlap@k of two strategies' neighbour tables, the mean over rows of ``|A_k ∩ B_k| / k``:
   two that agree closely cost the service twice for the same answers.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from core.banners import scan_banners
from core.dino.extract import Extractor, default_batch_size
from core.dino.strategies import Strategy
from core.dino.weights import ModelCache
from core.images import ImageRejected, open_image
from core.index import LoadedIndex
from core.knn import ExactSearch

from .alterations import ALTERATIONS, alterations, query_rng

ALL = "all"  # the row that pools every alteration


class EvaluationError(ValueError):
    """Bad input to an evaluation (no such strategy, no banners, a bad count): nothing was measured."""


@dataclass(frozen=True)
class Metrics:
    """Recall@1, recall@k and mAP@k (= MRR@k: one relevant item per query) over ``n`` queries."""

    recall_1: float
    recall_k: float
    map_k: float
    n: int


def metrics(ranks: np.ndarray, k: int) -> Metrics:
    """From the ranks of the originals (1 = first, 0 = not in the top k)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    found = (ranks >= 1) & (ranks <= k)
    ap = np.where(found, 1.0 / np.maximum(ranks, 1), 0.0)
    return Metrics(float((ranks == 1).mean()), float(found.mean()), float(ap.mean()), int(ranks.size))


@dataclass
class CopyDetection:
    """``ranks[strategy][alteration]``: the original's 1-based rank (0: not in the top ``k``) per query row, in
    the order of ``rows``; ``similarity``: each copy's cosine with its original's stored embedding."""

    k: int
    seed: int
    num_items: int  # banners searched (the index's rows)
    rows: list[int]
    ranks: dict[str, dict[str, np.ndarray]]
    similarity: dict[str, dict[str, np.ndarray]]
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (appid, why) of sampled rows left out
    requested: int = 0  # --queries as asked (more than the index holds: all rows)

    @property
    def strategies(self) -> list[str]:
        return list(self.ranks)

    def metrics(self, strategy: str, alteration: str = ALL) -> Metrics:
        """One strategy's metrics for one alteration, or over every (query, alteration) with ``ALL``."""
        by_alt = self.ranks[strategy]
        ranks = np.concatenate([by_alt[a] for a in ALTERATIONS]) if alteration == ALL else by_alt[alteration]
        return metrics(ranks, self.k)


def sample_rows(n: int, queries: int, seed: int) -> list[int]:
    """``min(queries, n)`` distinct rows out of ``n``, seeded, in ascending order."""
    if queries < 1:
        raise EvaluationError(f"--queries must be at least 1, got {queries}")
    return sorted(int(r) for r in np.random.default_rng(seed).choice(n, size=min(queries, n), replace=False))


def check_strategies(index: LoadedIndex, names: Sequence[str] | None) -> list[str]:
    """The names to evaluate: all of the index's for None, else each one checked to be there."""
    available = list(index.strategies)
    if names is None:
        return available
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in index.strategies]
    if not names or unknown:
        given = f"strategy {', '.join(map(repr, unknown))} is not in the index {index.path}" if names else "no strategy"
        raise EvaluationError(f"{given} (it has {', '.join(available)})")
    return names


def _check_k(k: object) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise EvaluationError(f"--k must be a positive integer, got {k!r}")


def make_extractors(
    index: LoadedIndex,
    strategies: Sequence[str],
    *,
    device: str | None = None,
    models: ModelCache | None = None,
) -> list[Extractor]:
    """Extractors that embed as the index did: its recorded strategies and checkpoints (``WeightsUnavailable``
    for another sha256). One extractor while each backbone has one checkpoint, so that an image is preprocessed
    once for every backbone; a backbone recorded with several checkpoints takes one more extractor per extra one."""
    groups: list[tuple[dict[str, str], list[Strategy]]] = []  # (backbone -> sha256, strategies) per extractor
    for name in strategies:
        entry = index.strategies[name].entry
        strategy = Strategy.from_manifest(name, entry)
        code, sha = strategy.backbone.code, entry["checkpoint"]["sha256"]
        for shas, members in groups:  # the first extractor without this backbone, or with this checkpoint of it
            if shas.setdefault(code, sha) == sha:
                members.append(strategy)
                break
        else:
            groups.append(({code: sha}, [strategy]))
    models = models if models is not None else ModelCache()  # a batch job: its own models by default
    return [Extractor(ms, device=device, expected_sha256=shas, models=models) for shas, ms in groups]


def embed(extractors: Sequence[Extractor], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
    """(len(images), dim) float32 features of RGB images for every strategy of the extractors."""
    return {name: f for extractor in extractors for name, f in extractor.embed_images(images).items()}


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
    extractors: Sequence[Extractor] | None = None,
) -> CopyDetection:
    """Alter a seeded sample of the index's banners, search each copy exactly among the index, rank the original.
    Banners whose file is missing or unreadable are skipped and listed (the index may be older than the folder)."""
    names = check_strategies(index, strategies)
    _check_k(k)
    if len(index) == 0:
        raise EvaluationError(f"the index {index.path} holds no banners")
    rows = sample_rows(len(index), queries, seed)
    paths = scan_banners(Path(images_dir))
    extractors = extractors or make_extractors(index, names, device=device)
    batch_size = batch_size or default_batch_size(extractors[0].device.type)
    ranker = _Ranker(index, names, extractors, min(k, len(index)))
    skipped: list[tuple[int, str]] = []
    total = len(rows) * len(ALTERATIONS)
    with tqdm(total=total, unit="img", desc="copy detection", disable=not progress) as bar:
        for row in rows:
            appid = int(index.appids[row])
            img, why = _open_query(paths.get(appid), appid, images_dir)
            if img is None:
                skipped.append((appid, why))
                bar.total -= len(ALTERATIONS)
                continue
            ranker.add(row, alterations(img, query_rng(seed, appid)))
            if len(ranker.pending) >= batch_size:
                bar.update(ranker.flush())
        bar.update(ranker.flush())
    if not ranker.rows:
        raise EvaluationError(f"none of the {len(rows)} sampled banners could be read from {images_dir}")
    return ranker.result(seed, skipped, queries)


def _open_query(path: Path | None, appid: int, images_dir: object) -> tuple[Image.Image | None, str]:
    """A sampled banner's image, or None and why it is left out."""
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
        self.searchers = {
            n: ExactSearch(index.strategies[n].embeddings, sketch=index.strategies[n].sketch) for n in names
        }
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
                self.sims[n][alt].append(float(np.dot(q.astype(np.float64), np.asarray(table[row], np.float64))))
        self.pending.clear()
        return done

    def result(self, seed: int, skipped: list[tuple[int, str]], requested: int) -> CopyDetection:
        ranks = {n: {a: np.array(v, dtype=np.int64) for a, v in by.items()} for n, by in self.ranks.items()}
        sims = {n: {a: np.array(v) for a, v in by.items()} for n, by in self.sims.items()}
        return CopyDetection(self.k, seed, len(self.index), self.rows, ranks, sims, skipped, requested)


@dataclass
class Overlap:
    """``matrix[i, j]``: the mean over rows of |top-k of strategies[i] ∩ top-k of strategies[j]| / k."""

    strategies: list[str]
    k: int
    matrix: np.ndarray
    requested_k: int = 0


def overlap_at_k(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean over rows of |a[:, :k] ∩ b[:, :k]| / k, for tables with distinct entries per row: in each row of
    the sorted concatenation, a shared neighbour appears twice, side by side."""
    both = np.sort(np.concatenate([np.asarray(a[:, :k]), np.asarray(b[:, :k])], axis=1), axis=1)
    return float((both[:, 1:] == both[:, :-1]).sum(axis=1).mean() / k)


def overlap_matrix(index: LoadedIndex, strategies: Sequence[str] | None = None, k: int = 10) -> Overlap:
    """Pairwise overlap@k of the neighbour tables (no weights needed), ``k`` capped to the narrowest table."""
    names = check_strategies(index, strategies)
    _check_k(k)
    k_eff = min([k] + [index.strategies[n].k for n in names])
    tables = [index.strategies[n].neighbours for n in names]
    m = np.eye(len(names))
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            m[i, j] = m[j, i] = overlap_at_k(tables[i], tables[j], k_eff)
    return Overlap(names, k_eff, m, requested_k=k)
