"""Exact cosine k-nearest-neighbour search over L2-normalised embeddings.

Why exact, and why not just a float64 brute force: the neighbour tables and
the upload search must give the answer a float64 brute force over the stored
values gives (scores as float64 rounded to float32, ties by the lower row
index), but float64 products run 2.5-4x slower than float32 ones on a CPU
(and a float64 matrix-vector product reads 4x the bytes of a float16 one).
So both entry points use the same two steps:

1. Prefilter: a fast low-precision product (float32 matrix product for the
   table, float16 matrix-vector product for a single query) with a rigorous
   bound ``eps`` on its error, derived from the norms of the rows, the
   rounding of the inputs and the standard bound ``gamma_D = D*u/(1-D*u)``
   for a length-D dot product accumulated in float32 (``u = 2**-24``).
2. Rescore in float64 every row whose prefilter score is within ``2*eps`` of
   the k-th best prefilter score, and sort by (-score, index). A row left out
   scores at most ``s + eps < t_k - eps``, strictly below k rows that all score
   at least ``t_k - eps``, so it cannot be in the top k, whatever the
   tie-break.

The float64 scores come from one deterministic kernel (torch's
``sampled_addmm``: one vectorised dot product per pair), so a pair gets the
same score whichever chunk, candidate set or thread computes it, and exact
ties (duplicate rows) fall back to the lower index. For float16 storage the
float64 sum of the exactly representable products is itself exact.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import numpy as np
import torch

__all__ = ["ExactSearch", "check_count", "check_table", "topk_table"]

_U32 = 2.0**-24  # unit roundoff of float32
_U16 = 2.0**-11  # unit roundoff of float16
_F16_SUBNORMAL_HALF_STEP = 2.0**-25  # largest rounding error of a float16 result below the normal range
_SAFETY = 1.0 + 2.0**-20  # covers the float64 rounding in the norms and in the bounds themselves
_STORAGE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NORM_CHUNK_ROWS = 4096


# ---------------------------------------------------------------------------------------------
# Validation and error bounds
# ---------------------------------------------------------------------------------------------


def check_table(embeddings: np.ndarray) -> np.ndarray:
    """The embeddings as a 2-D float16/32/64 array, without copying (memmaps stay memmaps)."""
    table = np.asarray(embeddings)
    if table.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {table.shape}")
    if table.dtype not in _STORAGE_DTYPES:
        raise ValueError(f"embeddings must be float16, float32 or float64, got {table.dtype}")
    n, dim = table.shape
    if n < 1 or dim < 1:
        raise ValueError(f"embeddings must have at least one row and one column, got shape {table.shape}")
    if n >= 2**31:
        raise ValueError(f"at most 2**31 - 1 rows are supported (int32 neighbour indices), got {n}")
    if dim * _U32 >= 0.5:
        raise ValueError(f"dimension {dim} is too large for the float32 error bound")
    return table


def check_count(value: int, name: str) -> int:
    """A positive int (bools and floats refused: they are always a caller's mistake here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _gamma(n: int, u: float) -> float:
    """Bound on the relative error of an n-term dot product accumulated with unit roundoff u."""
    return n * u / (1.0 - n * u)


def _underflow_bound(dim: int, amax: float) -> float:
    """Absolute error if denormal inputs, products or sums are flushed to zero (2**-126 each, D of each)."""
    return dim * 2.0**-126 * (2.0 * amax + 2.0)


def _slack(value: torch.Tensor | float) -> torch.Tensor | float:
    """A tiny widening of a threshold that absorbs the float64 rounding of the threshold itself."""
    return 2.0**-40 * (abs(value) + 1.0)


class _Norms:
    """Row norms of the stored values x, of their low-precision copy h and of the residual r = x - h.

    They bound the prefilter error per pair: |x_i.x_j - h_i.h_j| <= |r_i| |x_j| + |h_i| |r_j| (Cauchy-Schwarz),
    plus the accumulation error gamma_D |h_i| |h_j|. Every norm is inflated by _SAFETY.
    """

    def __init__(self, x: np.ndarray, h: np.ndarray, r: np.ndarray, amax: float) -> None:
        self.x, self.h, self.r = x * _SAFETY, h * _SAFETY, r * _SAFETY
        self.xmax = float(self.x.max())
        self.hmax = float(self.h.max())
        self.rmax = float(self.r.max())
        self.amax = amax  # largest |h| entry, for the underflow term

    @classmethod
    def of(cls, table: np.ndarray, low: np.ndarray) -> _Norms:
        """Computed in float64 chunk by chunk (bounded memory, one pass over a memmap); refuses NaN/inf.

        ``low`` is the prefilter's copy of the table (or the table itself); when its dtype holds every stored
        value exactly, h = x and r = 0.
        """
        n = table.shape[0]
        exact_copy = low is table or low.dtype.itemsize >= table.dtype.itemsize
        x, h, r = np.empty(n), np.empty(n), np.zeros(n)
        amax = 0.0
        for start in range(0, n, _NORM_CHUNK_ROWS):
            stop = min(n, start + _NORM_CHUNK_ROWS)
            stored = _torch_view(np.asarray(table[start:stop]))
            finite = torch.isfinite(stored).all(dim=1)
            if not finite.all():
                bad = start + int(torch.nonzero(~finite)[0, 0])
                raise ValueError(f"embeddings contain NaN or infinite values (row {bad})")
            xs = stored.double()
            x[start:stop] = torch.linalg.vector_norm(xs, dim=1).numpy()
            if exact_copy:
                hs = xs
                h[start:stop] = x[start:stop]
            else:
                hs = _torch_view(np.asarray(low[start:stop])).double()
                h[start:stop] = torch.linalg.vector_norm(hs, dim=1).numpy()
                r[start:stop] = torch.linalg.vector_norm(xs - hs, dim=1).numpy()
            lo, hi = torch.aminmax(hs)
            amax = max(amax, -float(lo), float(hi))
        return cls(x, h, r, amax)


# ---------------------------------------------------------------------------------------------
# float64 pair scores: one deterministic kernel for every pair
# ---------------------------------------------------------------------------------------------


def _pair_dots(left: torch.Tensor, right: torch.Tensor, crow: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """float64 dot products left[i] . right[cols[p]] for the CSR pattern (crow, cols), in pattern order.

    torch's CPU sampled_addmm computes each pair with one vectorised dot product over the two contiguous
    rows, so the value of a pair does not depend on the other pairs, the batch or the thread: identical rows
    get bit-identical scores, which is what makes the index tie-break meaningful.
    """
    if cols.numel() == 0:
        return torch.empty(0, dtype=torch.float64)
    pattern = torch.sparse_csr_tensor(
        crow,
        cols,
        torch.zeros(cols.numel(), dtype=torch.float64),
        size=(left.shape[0], right.shape[0]),
        check_invariants=False,
    )
    return torch.sparse.sampled_addmm(pattern, left, right.T, beta=0.0, alpha=1.0).values()


def _warm_up_sparse() -> None:
    """Trigger torch's once-only "sparse CSR is beta" warning here, silenced, rather than in a request.

    Called when a table or searcher is built, never at import: the service imports this module in the
    gunicorn master, where no torch op may start OpenMP threads before the fork.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = torch.ones(1, 1, dtype=torch.float64)
        _pair_dots(one, one, torch.tensor([0, 1]), torch.tensor([0]))


def _torch_view(array: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing the array's memory, also when it is read-only (a memmap): we never write to it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


# ---------------------------------------------------------------------------------------------
# The neighbour table
# ---------------------------------------------------------------------------------------------

_RESCORE_BLOCK_BYTES = 12 << 20  # a block of float64 rows that stays in a 32 MB L3 cache while it is rescored
_SORT_ROWS = 8192  # rows per padded sort of the final candidates


class _Float32Products:
    """Row chunk x all rows products in float32, by the fastest backend that passes a self-check.

    oneDNN (torch's mkldnn linear) runs about 1.6x as fast as OpenBLAS here, but its precision follows
    global settings (it may use bfloat16 when asked to), so a probe of real rows is compared with float64
    against the bound before a backend is trusted; OpenBLAS (numpy's matmul) is the fallback.
    """

    def __init__(self, low: torch.Tensor) -> None:
        self.low = low  # (N, D) float32, C-contiguous
        self._weight: torch.Tensor | None = None
        self.backend = "numpy"

    def use_mkldnn(self) -> bool:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return False
        try:
            self._weight = self.low.to_mkldnn()
            self.backend = "mkldnn"
            self(self.low[:1])
        except (RuntimeError, AttributeError, NotImplementedError):
            self.use_numpy()
            return False
        return True

    def use_numpy(self) -> None:
        self._weight, self.backend = None, "numpy"

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(b, D) float32 rows -> (b, N) float32 scores (a fresh, writable tensor)."""
        if self.backend == "mkldnn":
            return torch.ops.mkldnn._linear_pointwise(rows, self._weight, None, "none", [], "")
        return torch.from_numpy(np.matmul(rows.numpy(), self.low.numpy().T))


def _check_products(products: _Float32Products, low: torch.Tensor, exact: torch.Tensor, eps: np.ndarray) -> bool:
    """Do the prefilter products of a few real rows stay within their bound against float64?"""
    probe = min(exact.shape[0], 16)
    approx = products(low[:probe]).double()
    truth = exact[:probe] @ exact.T
    return bool(((approx - truth).abs() <= torch.from_numpy(eps[:probe])[:, None] + 1e-12).all())


def _margin(k: int) -> int:
    """Extra prefilter candidates kept per row so that almost every row is certified from its top list."""
    return max(16, k // 4)


def _chunk_candidates(block: torch.Tensor, start: int, k: int, c: int, eps: np.ndarray) -> tuple[torch.Tensor, ...]:
    """(local row, col) pairs that may be in each row's exact top k, sorted by row then col.

    block holds the float32 scores of rows start.. against every row, the row itself already at -inf.
    """
    rows_here, n = block.shape
    local = torch.arange(rows_here)
    top_values, top_index = torch.topk(block, c, dim=1)
    top64 = top_values.double()
    threshold = top64[:, k - 1] - 2.0 * torch.from_numpy(eps[start : start + rows_here])
    threshold = threshold - _slack(threshold)
    # Certified: everything outside the top c scores below the threshold (trivially so if c covers all rows).
    certified = torch.ones(rows_here, dtype=torch.bool) if c == n - 1 else top64[:, c - 1] < threshold
    keep = certified[:, None] & (top64 >= threshold[:, None])
    pair_rows = [local[:, None].expand(-1, c)[keep]]
    pair_cols = [top_index[keep]]
    loose = torch.nonzero(~certified).flatten()
    if loose.numel():
        # The margin was not enough (many near-ties): take every row within 2 eps from the full row.
        low_threshold = threshold[loose].float()
        low_threshold = torch.where(
            low_threshold.double() > threshold[loose],
            torch.nextafter(low_threshold, torch.tensor(-torch.inf)),
            low_threshold,
        )
        r, col = torch.nonzero(block[loose] >= low_threshold[:, None], as_tuple=True)
        pair_rows.append(loose[r])
        pair_cols.append(col)
    rows_t, cols_t = torch.cat(pair_rows), torch.cat(pair_cols)
    order = torch.argsort(rows_t * n + cols_t)
    return rows_t[order], cols_t[order]


def _rescore_pairs(exact: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """float64 scores of the pairs (rows sorted), by blocks of columns so that each block stays in cache."""
    n, dim = exact.shape
    block = int(max(64, min(n, _RESCORE_BLOCK_BYTES // (8 * dim))))
    block_of = cols // block
    order = np.argsort(block_of.astype(np.int32), kind="stable")  # stable: rows stay sorted within a block
    bounds = np.searchsorted(block_of[order], np.arange(0, (n + block - 1) // block + 1))
    dots = np.empty(rows.size, dtype=np.float64)
    for b, (p0, p1) in enumerate(itertools.pairwise(bounds)):
        if p0 == p1:
            continue
        part = order[p0:p1]
        crow = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows[part], minlength=n), out=crow[1:])
        local_cols = torch.from_numpy(cols[part] - b * block)
        right = exact[b * block : (b + 1) * block]
        dots[part] = _pair_dots(exact, right, torch.from_numpy(crow), local_cols).numpy()
    return dots


def _best_k(rows: np.ndarray, cols: np.ndarray, dots: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best pairs by (-score, col); pairs come sorted by (row, col), every row has at least k.

    Rows with a usual number of candidates are sorted as padded matrices of _SORT_ROWS rows (fast, bounded
    memory); rows with very many (large groups of near-duplicates) by a lexsort of their own pairs.
    """
    counts = np.bincount(rows, minlength=n)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    best_cols = np.empty((n, k), dtype=np.int64)
    best_scores = np.empty((n, k), dtype=np.float64)
    heavy = counts > 4 * k + 64
    for row in np.nonzero(heavy)[0]:
        lo, hi = starts[row], starts[row + 1]
        order = np.lexsort((cols[lo:hi], -dots[lo:hi]))[:k]
        best_cols[row] = cols[lo:hi][order]
        best_scores[row] = dots[lo:hi][order]
    for first in range(0, n, _SORT_ROWS):
        last = min(n, first + _SORT_ROWS)
        light = first + np.nonzero(~heavy[first:last])[0]
        if not light.size:
            continue
        p0, p1 = starts[first], starts[last]
        sel = ~heavy[rows[p0:p1]]
        slot = (np.cumsum(~heavy[first:last]) - 1)[rows[p0:p1][sel] - first]
        pos = (np.arange(p0, p1) - starts[rows[p0:p1]])[sel]
        neg = torch.full((light.size, int(counts[light].max())), torch.inf, dtype=torch.float64)
        col_grid = torch.zeros(neg.shape, dtype=torch.int64)
        slot_t, pos_t = torch.from_numpy(slot), torch.from_numpy(pos)
        neg[slot_t, pos_t] = -torch.from_numpy(dots[p0:p1][sel])
        col_grid[slot_t, pos_t] = torch.from_numpy(cols[p0:p1][sel])
        values, index = torch.sort(neg, dim=1, stable=True)  # stable: equal scores keep the lower col first
        best_cols[light] = torch.gather(col_grid, 1, index[:, :k]).numpy()
        best_scores[light] = -values[:, :k].numpy()
    return best_cols, best_scores


def topk_table(
    embeddings: np.ndarray,
    k: int,
    *,
    chunk_rows: int = 256,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k most similar other rows, exactly: ``(neighbours (N, k) int32, scores (N, k) float32)``.

    Similarity is the dot product of the stored values (float16/32/64, L2-normalised rows). The result
    equals a float64 brute force over the stored values: neighbours best first, ties broken by the lower
    row index, the row itself excluded; scores are the float64 scores rounded to float32. It does not
    depend on ``chunk_rows``. ``k`` is capped to N - 1 (a single row gives (1, 0) arrays).

    Method: float32 products of ``chunk_rows`` rows against all rows (never an N x N matrix); each row
    keeps its top k + margin candidates, certified with the float32 error bound eps_i (a row whose margin
    is not enough takes every row within 2 eps_i of its k-th score from the full float32 row instead);
    the candidates within 2 eps_i are rescored in float64 and sorted. The symmetry of E E^T is not used:
    measured at 30k x 1536, it halves the products (6.3 -> 3.8 s) but the top-k down the short columns of
    each panel adds 1.8 s, for a net 0.6 s (7%) before the merging of candidate lists it would need.

    ``progress``, when given, is called after each chunk with the number of rows just finished (so
    ``tqdm(total=N).update`` fits); the final float64 rescoring (about a tenth of the time) follows the
    last call.

    Peak memory: a float64 and a float32 copy of the table (12 N D bytes; 16 N D while the float32 copy
    is packed for oneDNN), 2-3 x chunk_rows x N float32 scores, and about 24 bytes per candidate pair
    (k plus a few per row) with as much again for sorting them: about 0.8 GB for 30k x 1536, k = 100.
    """
    table = check_table(embeddings)
    k = check_count(k, "k")
    chunk_rows = check_count(chunk_rows, "chunk_rows")
    n, dim = table.shape
    _warm_up_sparse()
    k = min(k, n - 1)
    if k == 0:
        _Norms.of(table, table)  # still refuse NaN/inf
        if progress is not None:
            progress(n)
        return np.empty((n, 0), dtype=np.int32), np.empty((n, 0), dtype=np.float32)

    exact = _torch_view(table).to(torch.float64, memory_format=torch.contiguous_format)  # never written to
    low = exact.float()
    norms = _Norms.of(table, low.numpy())
    if norms.xmax > 1e18:
        raise ValueError(f"embeddings must be L2-normalised; found a row of norm {norms.xmax:.3g}")
    eps = norms.r * norms.xmax + norms.h * norms.rmax + _gamma(dim, _U32) * norms.h * norms.hmax
    eps = (eps + _underflow_bound(dim, norms.amax)) * _SAFETY

    products = _Float32Products(low)
    if not (products.use_mkldnn() and _check_products(products, low, exact, eps)):
        products.use_numpy()
        if not _check_products(products, low, exact, eps):
            raise RuntimeError("float32 matrix products exceed their error bound; cannot certify exactness")
    if products.backend == "mkldnn":
        products.low = low = None  # oneDNN holds its own copy; chunks are converted from the float64 copy

    c = min(n - 1, k + _margin(k))
    all_rows, all_cols = [], []
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        block = products(low[start:stop] if low is not None else exact[start:stop].float())
        local = torch.arange(stop - start)
        block[local, local + start] = -torch.inf  # never the row itself
        rows_t, cols_t = _chunk_candidates(block, start, k, c, eps)
        del block
        all_rows.append((rows_t + start).numpy())
        all_cols.append(cols_t.numpy())
        if progress is not None:
            progress(stop - start)
    del products, low

    rows = np.concatenate(all_rows)
    cols = np.concatenate(all_cols)
    del all_rows, all_cols
    dots = _rescore_pairs(exact, rows, cols)
    best_cols, best_scores = _best_k(rows, cols, dots, n, k)
    return best_cols.astype(np.int32), best_scores.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Single-query search
# ---------------------------------------------------------------------------------------------


class ExactSearch:
    """Exact top-k of one query against a fixed table; built once, then safe to call from many threads.

    Prefilter: a float16 matrix-vector product (torch accumulates it in float32 and rounds the result to
    float16). For float16 storage it runs on the stored array itself (a zero-copy view, memmaps included);
    for float32/float64 (or non-contiguous) storage a float16 copy is made once, costing 2 N D bytes
    (92 MB for 30k x 1536).
    Its error against the float64 score is bounded by the query's own float16 rounding, the table's
    (norms of the residuals, computed once), the float32 accumulation and the float16 output rounding;
    every row whose bound reaches the k-th best is rescored in float64 from the stored values. When the
    float16 kernel cannot be trusted (torch's fp16 reduced-precision reduction switched on, values
    outside float16 range, or a failed self-check at start), every row is scored in float64 instead:
    slower, still exact. Searches share nothing mutable and never copy the table.
    """

    def __init__(self, embeddings: np.ndarray) -> None:
        table = check_table(embeddings)
        _warm_up_sparse()
        self._table = table
        self.n, self.dim = table.shape
        if table.dtype == np.float16 and table.flags.c_contiguous:
            low = table
        else:
            with np.errstate(over="ignore"):
                low = np.ascontiguousarray(table, dtype=np.float16)
        self._norms = _Norms.of(table, low)
        self._prefilter: torch.Tensor | None = None
        if np.isfinite(self._norms.hmax):
            self._prefilter = _torch_view(low)
            if not self._self_check():
                self._prefilter = None

    @property
    def uses_prefilter(self) -> bool:
        """Whether searches run the float16 prefilter (False: the slower full float64 pass)."""
        return self._prefilter is not None

    def search(self, query: np.ndarray, k: int, exclude: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The k rows most similar to ``query``: ``(indices int64, scores float32)``, best first.

        Exact as in ``topk_table``: the float64 brute force over the stored values and the query's values,
        ties by the lower index, scores rounded to float32. ``exclude`` drops one row (the query's own
        game). ``k`` is capped to the number of rows available.
        """
        q64 = self._check_query(query)
        k = check_count(k, "k")
        if exclude is not None:
            if isinstance(exclude, bool) or not isinstance(exclude, (int, np.integer)):
                raise ValueError(f"exclude must be a row index or None, got {exclude!r}")
            if not 0 <= exclude < self.n:
                raise ValueError(f"exclude must be a row index in [0, {self.n}), got {exclude}")
            exclude = int(exclude)
        k = min(k, self.n - (exclude is not None))
        if k == 0:
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
        candidates = self._candidates(q64, k, exclude)
        if candidates is None:
            candidates = np.arange(self.n)
            if exclude is not None:
                candidates = np.delete(candidates, exclude)
        return self._rescore(q64, candidates, k)

    def _check_query(self, query: np.ndarray) -> np.ndarray:
        q = np.asarray(query)
        if q.shape != (self.dim,):
            raise ValueError(f"query must have shape ({self.dim},), got {q.shape}")
        if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
            raise ValueError(f"query must be a real-valued array, got {q.dtype}")
        q64 = q.astype(np.float64)
        if not np.isfinite(q64).all():
            raise ValueError("query contains NaN or infinite values")
        return q64

    def _candidates(self, q64: np.ndarray, k: int, exclude: int | None) -> np.ndarray | None:
        """Rows that may be in the top k (sorted), or None when the prefilter cannot be used for this query."""
        if self._prefilter is None or torch._C._get_cpu_allow_fp16_reduced_precision_reduction():
            return None
        with np.errstate(over="ignore"):
            q16 = q64.astype(np.float16)
        if not np.isfinite(q16).all():
            return None
        approx = torch.mv(self._prefilter, torch.from_numpy(q16))
        if not torch.isfinite(approx).all():
            return None  # a query far from unit norm overflowed float16
        if exclude is not None:
            approx[exclude] = -torch.inf
        t_k = float(torch.topk(approx, k).values[-1])
        bound_abs, rel = self._bound(q64, q16)
        lower = t_k - bound_abs - rel * abs(t_k)
        lower -= _slack(lower)
        approx64 = approx.double()
        maybe = approx64 + bound_abs + rel * approx64.abs() >= lower
        if exclude is not None:
            maybe[exclude] = False
        return torch.nonzero(maybe).flatten().numpy()

    def _bound(self, q64: np.ndarray, q16: np.ndarray) -> tuple[float, float]:
        """|s_j - prefilter_j| <= bound_abs + rel |prefilter_j| for every row j."""
        norms = self._norms
        q16_64 = q16.astype(np.float64)
        q_residual = float(np.linalg.norm(q64 - q16_64)) * _SAFETY
        q_norm = float(np.linalg.norm(q16_64)) * _SAFETY
        bound = q_residual * norms.xmax + q_norm * norms.rmax + _gamma(self.dim, _U32) * q_norm * norms.hmax
        bound += _underflow_bound(self.dim, max(norms.amax, float(np.abs(q16_64).max())))
        # float16 output: |out - acc| <= u16 |acc| (or half a subnormal step), and |acc| <= |out| + |out - acc|.
        bound += _F16_SUBNORMAL_HALF_STEP / (1.0 - _U16)
        return bound * _SAFETY, _U16 / (1.0 - _U16) * _SAFETY

    def _rescore(self, q64: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """float64 scores of the candidates (read from the stored table), the k best by (-score, index)."""
        dots = np.empty(candidates.size, dtype=np.float64)
        query = torch.from_numpy(q64[None, :])
        step = _NORM_CHUNK_ROWS
        for start in range(0, candidates.size, step):
            part = candidates[start : start + step]
            rows = torch.from_numpy(np.asarray(self._table[part], dtype=np.float64))
            crow = torch.tensor([0, part.size])
            dots[start : start + step] = _pair_dots(query, rows, crow, torch.arange(part.size)).numpy()
        order = np.lexsort((candidates, -dots))[:k]
        return candidates[order].astype(np.int64), dots[order].astype(np.float32)

    def _self_check(self) -> bool:
        """Does the float16 kernel stay within the bound on real rows? (Guards against surprising builds.)"""
        probe_rows = min(self.n, 4096)
        rng = np.random.default_rng(0)
        base = np.asarray(self._table[min(self.n - 1, 7)], dtype=np.float64)
        for q64 in (base, base + rng.standard_normal(self.dim) / np.sqrt(self.dim)):
            q16 = q64.astype(np.float16)
            if not np.isfinite(q16).all():
                continue
            approx = torch.mv(self._prefilter[:probe_rows], torch.from_numpy(q16)).double().numpy()
            rows = torch.from_numpy(np.asarray(self._table[:probe_rows], dtype=np.float64))
            truth = torch.mv(rows, torch.from_numpy(q64)).numpy()
            bound_abs, rel = self._bound(q64, q16)
            if not (np.abs(approx - truth) <= bound_abs + rel * np.abs(approx) + 1e-12).all():
                return False
        return True
