"""Similar games from the tables, and from an image embedded on demand.

Lookups read one row of the tables: no model, no search. An upload is embedded with its strategy's backbone, loaded
on first use (once per process, shared by that backbone's strategies, only with the checkpoint whose sha256 the
index recorded), then searched exactly over the strategy's embeddings. Models and searchers are made in the worker
process, never in the gunicorn master: torch's OpenMP thread pool must not exist before the fork.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image

from core.dino.weights import ModelCache, WeightsUnavailable
from core.index import LoadedIndex
from core.table_rows import RowReader

from . import metrics
from .config import Settings

if TYPE_CHECKING:
    from core.dino.extract import Extractor
    from core.knn import ExactSearch

T = TypeVar("T")


class Matcher:
    def __init__(self, index: LoadedIndex, settings: Settings) -> None:
        self.index, self.settings = index, settings
        self.models = ModelCache()  # one model per backbone for this app, shared by its strategies
        self._lock = threading.Lock()
        self._extractors: dict[str, Extractor] = {}
        self._searchers: dict[str, ExactSearch] = {}
        self._failures: dict[str, tuple[float, str]] = {}
        self._unique: dict[str, np.ndarray] = {}
        self._readers: dict[tuple[str, str, str], RowReader] = {}
        # Forward passes at once in this process: each already uses all of the worker's torch threads, so more
        # would only share the same cores while multiplying activation memory (a 1 GB dyno has no room for it).
        self._forwards = threading.BoundedSemaphore(settings.concurrent_forwards)

    def table_matches(
        self, name: str, row: int, k: int, offset: int = 0, variant: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """Matches ``offset`` to ``offset + k`` of a row's table (a mirror/flip variant's when given)."""
        neighbours, scores = self.reader(name, "neighbours", variant), self.reader(name, "scores", variant)
        return neighbours.part(row, offset, offset + k), scores.part(row, offset, offset + k)

    def reader(self, name: str, array: str, variant: str = "") -> RowReader:
        """The rows of one of the strategy's stored arrays (``neighbours``, ``scores``, ``embeddings``,
        ``attention``; a mirror/flip variant's tables when given), read without mapping them (``core.table_rows``)."""
        key = (name, array, variant)
        reader = self._readers.get(key)
        if reader is None:
            s = self.index.strategies[name]
            reader = self._readers.setdefault(key, RowReader(getattr(s.variants[variant] if variant else s, array)))
        return reader

    def unique(self, name: str, n: int) -> list[int]:
        """Rows whose best match is least similar, least similar first (ties: lower row first)."""
        order = self._unique.get(name)
        if order is None:
            s = self.index.strategies[name]
            best = self.reader(name, "scores").column(0) if s.k else np.zeros(len(self.index), np.float32)
            order = np.argsort(best, kind="stable")
            self._unique[name] = order
        return order[:n].tolist()

    def _once(self, made: dict, name: str, make: Callable[[str], T]) -> T:
        """``made[name]``, made by ``make(name)`` under the lock on first use."""
        found = made.get(name)
        if found is None:
            with self._lock:
                found = made.get(name)
                if found is None:
                    found = made[name] = make(name)
        return found

    def extractor(self, name: str) -> Extractor:
        """The strategy's extractor, loading its backbone on first use; WeightsUnavailable if it cannot."""
        return self._once(self._extractors, name, self._load)

    def _load(self, name: str) -> Extractor:
        from core.dino.extract import Extractor, configure_threads

        failed = self._failures.get(name)
        if failed and time.monotonic() - failed[0] < self.settings.weights_retry_seconds:
            raise WeightsUnavailable(failed[1])
        if self.settings.torch_threads:  # else: gunicorn's post_fork or torch's default
            configure_threads(self.settings.torch_threads)
        s = self.index.strategies[name]
        before, t0 = set(self.loaded_backbones()), time.perf_counter()
        try:
            ex = Extractor(
                [s.strategy],
                device="cpu",
                expected_sha256={s.strategy.backbone.code: s.checkpoint["sha256"]},
                download=self.settings.allow_weights_download,
                models=self.models,
                attention=True,
            )
        except WeightsUnavailable as e:
            self._failures[name] = (time.monotonic(), str(e))
            raise
        self._failures.pop(name, None)
        for code in set(self.loaded_backbones()) - before:
            metrics.model_loaded(code, time.perf_counter() - t0)
        return ex

    def searcher(self, name: str) -> ExactSearch:
        from core.knn import ExactSearch

        s = self.index.strategies[name]
        return self._once(self._searchers, name, lambda _: ExactSearch(s.embeddings, sketch=s.sketch))

    def embed(self, name: str, image: Image.Image) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """The image's embedding for a strategy, exactly as the index embedded its banners, and its attention map."""
        ex = self.extractor(name)
        t0 = time.perf_counter()
        tensors = ex.preprocess([image])
        t1 = time.perf_counter()
        with self._forwards:
            tw = time.perf_counter()
            features = ex.embed_tensors(tensors)
        t2 = time.perf_counter()
        timings = {"preprocess": (t1 - t0) * 1000, "queue": (tw - t1) * 1000, "forward": (t2 - tw) * 1000}
        return features[name][0], features[ex.strategies[0].attention_name][0], timings

    def patch_matches(self, name: str, a: Image.Image, b: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """Each patch's best cosine to the other image's patches (``Extractor.patch_matches``): two forwards."""
        ex = self.extractor(name)
        with self._forwards:
            return ex.patch_matches(a, b)

    def search(self, name: str, vector: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """The k rows nearest to a vector, their cosines and the search's time (ms)."""
        t0 = time.perf_counter()
        if k < 1:  # a table without neighbours (k = 0) answers no matches, as its lookups do
            return np.empty(0, np.int64), np.empty(0, np.float32), {"search": 0.0}
        rows, scores = self.searcher(name).search(vector.astype(np.float32), k)
        return rows, scores, {"search": (time.perf_counter() - t0) * 1000}

    def loaded_backbones(self) -> list[str]:
        return sorted({lb.backbone.code for lb in self.models.loaded()})
