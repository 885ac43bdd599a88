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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from core.dino.weights import MODELS, ModelCache, WeightsUnavailable
from core.index import LoadedIndex
from core.table_rows import RowReader

if TYPE_CHECKING:
    from core.dino.extract import Extractor
    from core.knn import ExactSearch


@dataclass
class ImageMatches:
    rows: np.ndarray
    scores: np.ndarray
    timings_ms: dict[str, float]


class Matcher:
    def __init__(
        self,
        index: LoadedIndex,
        *,
        allow_download: bool = True,
        retry_seconds: float = 60.0,
        torch_threads: int | None = None,
        models: ModelCache = MODELS,
        concurrent_forwards: int = 1,
        on_model_load: Callable[[str, float], None] | None = None,
    ) -> None:
        self.index, self.models, self.on_model_load = index, models, on_model_load  # (backbone, seconds): metrics
        self.allow_download, self.retry_seconds, self.torch_threads = allow_download, retry_seconds, torch_threads
        self._lock = threading.Lock()
        self._extractors: dict[str, Extractor] = {}
        self._searchers: dict[str, ExactSearch] = {}
        self._failures: dict[str, tuple[float, str]] = {}
        self._unique: dict[str, np.ndarray] = {}
        self._tables: dict[tuple[str, str], tuple[RowReader, RowReader]] = {}
        self._threads_set = False
        # Forward passes at once in this process: each already uses all of the worker's torch threads, so more
        # would only share the same cores while multiplying activation memory (a 1 GB dyno has no room for it).
        self._forwards = threading.BoundedSemaphore(max(1, concurrent_forwards))

    def table_matches(
        self, name: str, row: int, k: int, offset: int = 0, variant: str = ""
    ) -> tuple[np.ndarray, np.ndarray]:
        """Matches ``offset`` to ``offset + k`` of a row's table (a mirror/flip variant's when given)."""
        neighbours, scores = self._readers(name, variant)
        return neighbours.part(row, offset, offset + k), scores.part(row, offset, offset + k)

    def _readers(self, name: str, variant: str = "") -> tuple[RowReader, RowReader]:
        """The table's rows, read without mapping them (``core.table_rows``)."""
        readers = self._tables.get((name, variant))
        if readers is None:
            s = self.index.strategies[name]
            t = s.variants[variant] if variant else s
            readers = self._tables.setdefault((name, variant), (RowReader(t.neighbours), RowReader(t.scores)))
        return readers

    def unique(self, name: str, n: int) -> list[int]:
        """Rows whose best match is least similar, least similar first (ties: lower row first)."""
        order = self._unique.get(name)
        if order is None:
            s = self.index.strategies[name]
            best = self._readers(name)[1].column(0) if s.k else np.zeros(len(self.index), np.float32)
            order = np.argsort(best, kind="stable")
            self._unique[name] = order
        return order[:n].tolist()

    def extractor(self, name: str) -> Extractor:
        """The strategy's extractor, loading its backbone on first use; WeightsUnavailable if it cannot."""
        ex = self._extractors.get(name)
        if ex is not None:
            return ex
        from core.dino.extract import Extractor, configure_threads

        with self._lock:
            ex = self._extractors.get(name)
            if ex is not None:
                return ex
            failed = self._failures.get(name)
            if failed and time.monotonic() - failed[0] < self.retry_seconds:
                raise WeightsUnavailable(failed[1])
            if self.torch_threads and not self._threads_set:  # else: gunicorn's post_fork or torch's default
                configure_threads(self.torch_threads)
                self._threads_set = True
            s = self.index.strategies[name]
            before = set(self.loaded_backbones())
            t0 = time.perf_counter()
            try:
                ex = Extractor(
                    [s.strategy],
                    device="cpu",
                    expected_sha256={s.strategy.backbone.code: s.checkpoint["sha256"]},
                    download=self.allow_download,
                    models=self.models,
                    attention=True,
                )
            except WeightsUnavailable as e:
                self._failures[name] = (time.monotonic(), str(e))
                raise
            self._failures.pop(name, None)
            self._extractors[name] = ex
            if self.on_model_load is not None:
                for code in set(self.loaded_backbones()) - before:
                    self.on_model_load(code, time.perf_counter() - t0)
            return ex

    def searcher(self, name: str) -> ExactSearch:
        se = self._searchers.get(name)
        if se is None:
            from core.knn import ExactSearch

            with self._lock:
                se = self._searchers.get(name)
                if se is None:
                    s = self.index.strategies[name]
                    se = ExactSearch(s.embeddings, sketch=s.sketch)
                    self._searchers[name] = se
        return se

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

    def search(self, name: str, vector: np.ndarray, k: int) -> ImageMatches:
        t0 = time.perf_counter()
        rows, scores = self.searcher(name).search(vector.astype(np.float32), k)
        return ImageMatches(rows, scores, {"search": (time.perf_counter() - t0) * 1000})

    def loaded_backbones(self) -> list[str]:
        return sorted({lb.backbone.code for lb in self.models.loaded()})
