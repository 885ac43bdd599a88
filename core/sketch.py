"""An int8 sketch of an embedding table: approximate scores of one query, each with a rigorous error bound.

An upload's search scans it instead of the float16 embeddings (half the bytes: what a 1 GiB dyno's page cache can
hold for a whole catalog). SimSIMD sums the int8 products exactly in int32, which numpy and torch cannot.

Row i is stored as ``x_i ~ s_i * (t * c_i)``: ``t`` a per-column scale (so that a few large feature dimensions do
not coarsen all the others), ``s_i`` a per-row scale, ``c_i`` int8 codes in [-127, 127]. A query ``u`` is coded
the same way as ``u * t ~ s_q * c_q``. Then ``s_q s_i (c_q . c_i)`` differs from ``u . x_i`` by
``u . e_i + s_i (u t - s_q c_q) . c_i`` (``e_i`` the row's rounding), so by at most
``|u| |e_i| + s_i |c_i| |u t - s_q c_q|``: both norms per row are computed once, in float64.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from core.cpu import cpu_cores

_LEVELS = 127  # codes in [-127, 127] (a stored -128 is harmless: sums fit int32 for D < 131,072 either way)
_ROWS = 1024  # rows quantised per step: bounded float64 temporaries
_SLACK = 1.0 + 2.0**-30  # covers the float64 rounding of the bound's own terms (a few ulps each)
_TINY = 2.0**-40  # and, absolutely, of the float64 scores themselves (|score| <= ~1)


def sketch_fits(dim: int) -> bool:
    """Whether int32 sums of D int8 products cannot overflow."""
    return dim * 128**2 < 2**31


def _kernel():
    import simsimd  # imported here: table builds (core.knn.topk_table) do not need it

    return simsimd


class CodedQuery(NamedTuple):
    """A query as the sketch scores it: its norm, int8 codes at a scale, and what they leave out."""

    norm: float
    codes: np.ndarray
    scale: float
    residual: np.ndarray


class Int8Sketch:
    """int8 codes of a table's rows, with what bounds their scores' error; immutable once made. The index stores
    its ``arrays()`` (``<Strategy>/sketch/``), mapped and shared by the service's workers."""

    FILES = ("codes.npy", "columns.npy", "rows.npy")

    def __init__(self, codes: np.ndarray, column_scale: np.ndarray, rows: np.ndarray) -> None:
        if not sketch_fits(codes.shape[1]):
            raise ValueError(f"dimension {codes.shape[1]} is too large for int32 sums of int8 products")
        self.codes = codes
        self.column_scale = column_scale
        self.rows = rows
        self.row_scale, self.row_error, self.code_norm = rows  # s_i; |e_i| = |x_i - s_i t c_i|; s_i |c_i|

    @classmethod
    def of(cls, table: np.ndarray) -> Int8Sketch:
        """The sketch of a 2-D float table (a memmap is read a block of rows at a time)."""
        n, dim = table.shape
        peak = _column_peaks(table)
        column_scale = np.where(peak > 0, peak, 1.0)
        codes = np.empty((n, dim), dtype=np.int8)
        rows = np.empty((3, n))

        def quantise(start: int) -> None:  # blocks are independent: numpy runs them on all cores
            block = np.asarray(table[start : start + _ROWS], dtype=np.float64)
            _quantise(block, column_scale, codes[start : start + len(block)], rows[:, start : start + len(block)])

        with ThreadPoolExecutor(max(1, min(cpu_cores(), -(-n // _ROWS)))) as pool:
            list(pool.map(quantise, range(0, n, _ROWS)))
        return cls(codes, column_scale, rows)

    def arrays(self) -> dict[str, np.ndarray]:
        """What the index stores, by file name."""
        return dict(zip(self.FILES, (self.codes, self.column_scale, self.rows), strict=True))

    def coded(self, unit: np.ndarray) -> CodedQuery:
        """A query (float64, unit length or zero) coded once for ``scores`` and ``refined``."""
        codes, scale, residual = _coded(unit * self.column_scale)
        return CodedQuery(float(np.linalg.norm(unit)), codes, scale, residual)

    def scores(self, query: CodedQuery, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Approximate ``unit . x_i`` for every row (float64) and each one's error bound."""
        approx = (query.scale * self.row_scale) * self.dots(query.codes, threads)
        return approx, self._bound(query.norm, query.residual, slice(None))

    def refined(self, query: CodedQuery, rows: np.ndarray, approx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Closer scores (and bounds) of some rows given their ``scores`` (``approx``): a second int8 level codes
        what the first left of the query, so only the rows' rounding remains."""
        codes, scale, left = _coded(query.residual)
        rows = np.asarray(rows, dtype=np.intp)
        if rows.size == 0:
            return np.empty(0), np.empty(0)
        dots = np.asarray(_kernel().cdist(codes[None], self.codes[rows], metric="dot"), dtype=np.float64)
        return approx + (scale * self.row_scale[rows]) * dots.reshape(-1), self._bound(query.norm, left, rows)

    def _bound(self, norm: float, residual: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
        """``|u| |e_i| + s_i |c_i| |r|``: ``|u|`` the query's norm, ``r`` what its coding left out; widened."""
        bound = (norm * _SLACK) * self.row_error[rows]
        bound += (float(np.linalg.norm(residual)) * _SLACK) * self.code_norm[rows]
        bound += _TINY
        return bound

    def dots(self, query_codes: np.ndarray, threads: int = 1) -> np.ndarray:
        """Exact integer dot products of int8 query codes with every row's codes, as float64."""
        out = _kernel().cdist(query_codes[None], self.codes, metric="dot", threads=max(1, threads))
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def kernel_is_exact(self) -> bool:
        """Do the kernel's sums equal numpy's int64 ones here (extreme codes included)? Checked once per table."""
        rows = np.asarray(self.codes[:256])
        rng = np.random.default_rng(0)
        for query in (np.full(rows.shape[1], 127, np.int8), rng.integers(-127, 128, rows.shape[1], dtype=np.int8)):
            truth = rows.astype(np.int64) @ query.astype(np.int64)
            if not np.array_equal(self.dots(query)[: len(rows)], truth.astype(np.float64)):
                return False
        extreme = np.full((1, rows.shape[1]), -127, np.int8)
        return float(np.asarray(_kernel().cdist(extreme, extreme, metric="dot"))[0, 0]) == rows.shape[1] * 127.0**2


def _quantise(block: np.ndarray, column_scale: np.ndarray, codes: np.ndarray, rows: np.ndarray) -> None:
    """A float64 block's codes and its rows' scale, error norm and code norm, mostly in place."""
    work = block / column_scale
    row_scale = _round_to_codes(work)
    codes[:] = work
    rows[0] = row_scale
    rows[2] = row_scale * np.sqrt(np.einsum("ij,ij->i", work, work))
    work *= row_scale[:, None]
    work *= column_scale
    np.subtract(block, work, out=work)  # each row's rounding error e_i, its sign aside
    rows[1] = np.sqrt(np.einsum("ij,ij->i", work, work))


def _column_peaks(table: np.ndarray) -> np.ndarray:
    """Each column's largest |value|, as float64; for float16 on the bits (without the sign bit, finite float16
    values order as their uint16 patterns, and integer reductions are many times faster)."""
    peak = np.zeros(table.shape[1])
    for start in range(0, table.shape[0], _ROWS):
        rows = np.asarray(table[start : start + _ROWS])
        if rows.dtype == np.float16:
            bits = (rows.view(np.uint16) & np.uint16(0x7FFF)).max(axis=0)
            np.maximum(peak, bits.view(np.float16).astype(np.float64), out=peak)
        else:
            np.maximum(peak, np.abs(rows).max(axis=0), out=peak)
    return peak


def _coded(vector: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """A float64 vector's int8 codes, their scale, and what they leave out (``vector - scale * codes``)."""
    rounded = vector[None].copy()
    scale = float(_round_to_codes(rounded)[0])
    return rounded[0].astype(np.int8), scale, vector - scale * rounded[0]


def _round_to_codes(rows: np.ndarray) -> np.ndarray:
    """Round float64 rows, in place, to integers in [-127, 127] of the row's peak; each row's scale (0: all zero)."""
    peak = np.maximum(rows.max(axis=1), -rows.min(axis=1))
    rows *= np.divide(_LEVELS, peak, out=np.zeros_like(peak), where=peak > 0)[:, None]
    np.rint(rows, out=rows)
    np.clip(rows, -_LEVELS, _LEVELS, out=rows)
    return peak / _LEVELS
