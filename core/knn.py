"""Exact cosine k-nearest neighbours over stored (L2-normalised) embeddings.

"Exact": the neighbours and scores of a float64 brute force over the stored values, best first, ties to the lower
row, scores rounded to float32, so that the tables and the upload search agree (for float16 storage the float64
sums are exact in any order). Both entry points prefilter in lower precision under a rigorous error bound ``E`` and
rescore in float64 only the rows within ``2 E`` of the k-th best: ``topk_table`` (offline) with float32 products,
``ExactSearch`` (one upload) with an int8 sketch (``core.sketch``); where the sketch's integer kernel fails its
probe, searches scan in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.cpu import cpu_cores
from core.sketch import Int8Sketch, sketch_fits
from core.table_rows import RowReader

_U32 = 2.0**-24  # unit roundoff of float32 (the prefilter's accumulator)
_SAFETY = 1.0 + 2.0**-20  # widens every bound past the float64 rounding of the bound itself
_MAX_NORM = 2.0**40  # rows beyond this are not normalised embeddings (and could overflow float32 sums)
_SCAN_ROWS = 256  # rows per step of a float64 pass (3 MB at D = 1536): small transients in each worker


def check_table(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings as a 2-D float array, not copied (a memmap stays a memmap)."""
    table = np.asarray(embeddings)
    if table.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {table.shape}")
    if table.dtype not in (np.float16, np.float32, np.float64):
        raise ValueError(f"embeddings must be float16, float32 or float64, got {table.dtype}")
    if table.shape[0] < 1 or table.shape[1] < 1:
        raise ValueError(f"embeddings must have at least one row and one column, got shape {table.shape}")
    if table.shape[0] >= 2**31:
        raise ValueError(f"at most 2**31 - 1 rows are supported (int32 neighbour indices), got {table.shape[0]}")
    if table.shape[1] * _U32 >= 0.5:
        raise ValueError(f"dimension {table.shape[1]} is too large for the float32 error bound")
    return table


def check_count(value: int, name: str) -> int:
    """A positive int (bools and floats refused: they are always a caller's mistake here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _row_norms(table: np.ndarray, other: np.ndarray | None = None) -> np.ndarray:
    """float64 norms of the rows (of ``table - other`` when given), one pass; refuses NaN and infinities."""
    norms = np.empty(table.shape[0])
    for start in range(0, table.shape[0], _SCAN_ROWS):
        rows = np.asarray(table[start : start + _SCAN_ROWS], dtype=np.float64)
        if other is not None:
            rows = rows - other[start : start + _SCAN_ROWS]  # never in place: rows may be a view of the table
        norms[start : start + len(rows)] = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    if not np.isfinite(norms).all():
        raise ValueError(f"embeddings contain NaN or infinite values (row {np.flatnonzero(~np.isfinite(norms))[0]})")
    if norms.max() > _MAX_NORM:
        raise ValueError(f"embeddings must be L2-normalised; found a row of norm {norms.max():.3g}")
    return norms


def _best(rows: np.ndarray, cols: np.ndarray, source: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row's candidate columns (R, C) by (-float64 score, column): columns and scores, each
    score one dot product of two stored rows (einsum: the same sum for identical pairs)."""
    left = np.asarray(source[rows], dtype=np.float64)
    right = np.asarray(source[cols], dtype=np.float64)
    scores = np.einsum("rcd,rd->rc", right, left)
    order = np.lexsort((cols, -scores), axis=-1)[:, :k]
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(scores, order, axis=1)


def _chunk_top(block: np.ndarray, start: int, k: int, bound: float, source: np.ndarray) -> tuple[np.ndarray, ...]:
    """Exact top k of each row of a chunk, from its float32 scores ``block`` (the row itself at -inf).

    A row's candidates are its best c = k + margin float32 scores when the c-th is more than 2 E below the k-th
    (no other column can reach its top k); otherwise every column within 2 E of the k-th (many near-ties).
    """
    r, n = block.shape
    c = min(n - 1, k + max(16, k // 4))
    top = np.argpartition(-block, c - 1, axis=1)[:, :c]
    values = np.sort(np.take_along_axis(block, top, axis=1).astype(np.float64), axis=1)
    threshold = values[:, c - k] - 2.0 * bound
    threshold -= _tie_slack(threshold)
    sure = (values[:, 0] < threshold) | (c == n - 1)
    cols, scores = np.empty((r, k), dtype=np.int64), np.empty((r, k))
    rows = np.flatnonzero(sure)
    step = max(1, 2**21 // (c * source.shape[1]))  # rows per float64 gather (~16 MB)
    for s in range(0, rows.size, step):
        part = rows[s : s + step]
        cols[part], scores[part] = _best(part + start, top[part], source, k)
    for row in np.flatnonzero(~sure):
        near = np.flatnonzero(block[row] >= threshold[row])
        best_cols, best_scores = _best(np.array([row + start]), near[None], source, k)
        cols[row], scores[row] = best_cols[0], best_scores[0]
    return cols, scores


def topk_table(
    embeddings: np.ndarray,
    k: int,
    *,
    chunk_rows: int = 512,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k most similar other rows (itself excluded, ``k`` capped to N - 1), exactly: ``(neighbours
    (N, k) int32, scores (N, k) float32)``; ``progress(rows)`` after each chunk."""
    table = check_table(embeddings)
    k = check_count(k, "k")
    chunk_rows = check_count(chunk_rows, "chunk_rows")
    n, dim = table.shape
    norm_max = float(_row_norms(table).max())
    k = min(k, n - 1)
    low = np.ascontiguousarray(table, dtype=np.float32)
    residual = float(_row_norms(table, low).max()) if table.dtype == np.float64 else 0.0
    gamma = dim * _U32 / (1.0 - dim * _U32)  # float32 accumulation of D products
    low_max = norm_max + residual
    bound = (2.0 * residual * low_max + gamma * low_max**2 + dim * 2.0**-124) * _SAFETY
    source = table if residual else low  # the stored values: the float32 copy when it holds them exactly
    neighbours = np.empty((n, k), dtype=np.int32)
    scores = np.empty((n, k), dtype=np.float32)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        if k:
            block = low[start:stop] @ low.T
            block[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never the row itself
            neighbours[start:stop], scores[start:stop] = _chunk_top(block, start, k, bound, source)
        if progress is not None:
            progress(stop - start)
    return neighbours, scores


class ExactSearch:
    """Exact top k of one query against a fixed table; built once, then safe to call from many threads. The int8
    ``sketch`` (the index's, else one made now) prefilters, so a memory-mapped table is left mostly unread."""

    def __init__(self, embeddings: np.ndarray, sketch: Int8Sketch | None = None) -> None:
        table = check_table(embeddings)
        # the rescored rows, read without mapping the file (check_table's array is a plain view of it)
        self._rows = RowReader(embeddings if isinstance(embeddings, np.memmap) else table)
        self.n, self.dim = table.shape
        if sketch is not None and sketch.codes.shape != table.shape:
            raise ValueError(f"the sketch's shape {sketch.codes.shape} is not the table's {table.shape}")
        if sketch is None:
            _row_norms(table)  # refuses NaN, infinities and rows far from unit length
            sketch = Int8Sketch.of(table) if sketch_fits(self.dim) else None
        self._sketch = sketch if sketch is not None and sketch.kernel_is_exact() else None

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k rows most similar to ``query``: ``(rows int64, scores float32)``, best first, exact (k capped to N)."""
        q = self._check_query(query)
        k = min(check_count(k, "k"), self.n)
        if self._sketch is not None:
            rows, scores = self._rescored(q, k)
        else:
            rows = np.arange(self.n)
            scores = self._exact_scores(q, rows)
        best = np.lexsort((rows, -scores))[:k]
        return rows[best].astype(np.int64), scores[best].astype(np.float32)

    def _check_query(self, query: np.ndarray) -> np.ndarray:
        q = np.asarray(query)
        if q.shape != (self.dim,):
            raise ValueError(f"query must have shape ({self.dim},), got {q.shape}")
        if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
            raise ValueError(f"query must be a real-valued array, got {q.dtype}")
        q = q.astype(np.float64)
        if not np.isfinite(q).all():
            raise ValueError("query contains NaN or infinite values")
        return q

    def _rescored(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of every row that can reach the top k, and of few more: the k best approximations,
        rescored, set a floor; only rows whose bound still reaches it at the sketch's second level are rescored."""
        norm = float(np.linalg.norm(q)) or 1.0
        unit = q / norm
        query = self._sketch.coded(unit)
        approx, bound = self._sketch.scores(query, cpu_cores())
        first = np.argpartition(approx, approx.size - k)[approx.size - k :]
        scores = self._exact_scores(q, first)
        floor = scores.min() / norm  # of the unit query
        floor -= _tie_slack(floor)
        upper = np.add(approx, bound, out=bound)
        upper[first] = -np.inf
        rest = np.flatnonzero(upper >= floor)
        fine, fine_bound = self._sketch.refined(query, rest, approx[rest])
        rest = rest[fine + fine_bound >= floor]
        return np.concatenate([first, rest]), np.concatenate([scores, self._exact_scores(q, rest)])

    def _exact_scores(self, q: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float64 scores, each one dot product as in ``topk_table`` (identical rows score identically)."""
        scores = np.empty(rows.size)
        for start in range(0, rows.size, _SCAN_ROWS):
            part = rows[start : start + _SCAN_ROWS]
            scores[start : start + part.size] = np.einsum("nd,d->n", self._rows.rows(part).astype(np.float64), q)
        return scores


def _tie_slack(score: float | np.ndarray) -> float | np.ndarray:
    """Room for the float64 rounding of scores near ``score``, so that ties at a threshold are kept."""
    return 2.0**-40 * (np.abs(score) + 1.0)
