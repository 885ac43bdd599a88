"""Exact cosine kNN (core/knn.py): equal to a float64 brute force over the stored values, ties by the lower index.

The references here are deliberately plain: dot products and a stable sort, so that a bug in the
prefilter bound, the candidate selection or the tie-break shows up as a difference. For float16
storage a float64 matrix product is exact (and so position-independent); for float32/float64 storage
the reference accumulates in long double (or uses math.fsum), because BLAS can give two identical rows
scores one float64 ulp apart, which would make exact ties look like a wrong order.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from core import knn, sketch
from core.knn import ExactSearch, topk_table


def unit_rows(n: int, d: int, seed: int = 0, dtype=np.float16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def clustered_rows(n: int, d: int, centres: int, noise: float, seed: int = 0, dtype=np.float16) -> np.ndarray:
    """Small perturbations of a few centres: many scores within float16/float32 rounding of each other."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def fsum_scores(table: np.ndarray) -> np.ndarray:
    """Correctly rounded float64 dot products (products of float16/32 values are exact in float64)."""
    x = table.astype(np.float64)
    n = len(x)
    s = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            s[i, j] = math.fsum(x[i] * x[j])
    return s


def dots(table: np.ndarray, other: np.ndarray) -> np.ndarray:
    """float64 table @ other, the same value for identical rows (exact for float16 x float16, else long double)."""
    if table.dtype == other.dtype == np.float16:
        return table.astype(np.float64) @ other.astype(np.float64)
    return (table.astype(np.longdouble) @ other.astype(np.longdouble)).astype(np.float64)


def brute_table(table: np.ndarray, k: int, scores: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every row's k best other rows by float64 score, ties by lower index (stable sort of -score)."""
    s = dots(table, table.T) if scores is None else scores.copy()
    np.fill_diagonal(s, -np.inf)
    k = min(k, len(table) - 1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(s, order, axis=1)


def brute_search(table: np.ndarray, query: np.ndarray, k: int):
    s = dots(table, query)
    order = np.argsort(-s, kind="stable")[:k]
    return order, s[order]


def assert_table_exact(table: np.ndarray, k: int, chunk_rows: int, ref_scores: np.ndarray | None = None) -> None:
    neighbours, scores = topk_table(table, k, chunk_rows=chunk_rows)
    ref_n, ref_s = brute_table(table, k, ref_scores)
    assert neighbours.dtype == np.int32 and scores.dtype == np.float32
    assert neighbours.shape == scores.shape == ref_n.shape
    np.testing.assert_array_equal(neighbours, ref_n)
    assert np.abs(scores - ref_s).max(initial=0.0) <= 1e-7
    np.testing.assert_array_equal(scores, ref_s.astype(np.float32))
    assert not (neighbours == np.arange(len(table))[:, None]).any()


# ---------------------------------------------------------------------------------------------
# topk_table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize(
    ("n", "d", "k", "chunk_rows"),
    [
        (2, 8, 1, 1),
        (2, 8, 5, 4),  # k > N - 1: capped to 1
        (37, 16, 36, 5),  # k = N - 1, N not a multiple of the chunk
        (100, 384, 10, 33),
        (257, 64, 300, 64),  # k > N - 1
        (300, 1536, 20, 256),
    ],
)
def test_table_equals_brute_force(dtype, n, d, k, chunk_rows):
    assert_table_exact(unit_rows(n, d, seed=n + d, dtype=dtype), k, chunk_rows)


def test_single_row_gives_empty_table():
    neighbours, scores = topk_table(unit_rows(1, 8), 5)
    assert neighbours.shape == scores.shape == (1, 0)
    assert neighbours.dtype == np.int32 and scores.dtype == np.float32


def test_float64_storage_left_unchanged():
    table = unit_rows(120, 48, seed=3, dtype=np.float64)  # not exact in float32: residual terms in the bound
    original = table.copy()
    assert_table_exact(table, 7, 50)
    ExactSearch(table).search(table[0], 3)
    np.testing.assert_array_equal(table, original)
    assert_table_exact(table.astype(np.float16), 7, 50)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_duplicates_and_ties_by_lower_index_any_chunk(dtype):
    rng = np.random.default_rng(7)
    table = unit_rows(40, 12, seed=1, dtype=dtype)
    table[[5, 17, 30]] = table[2]  # exact duplicates: score 1 with each other
    table[[8, 25]] = table[11]
    basis = np.eye(12, dtype=dtype)
    table[33:39] = basis[[0, 1, 2, 0, 3, 1]]  # orthogonal rows: exact 0 ties, duplicates of e0 and e1
    table = table[rng.permutation(40)]
    reference = fsum_scores(table)
    results = [topk_table(table, 9, chunk_rows=c) for c in (1, 3, 7, 40, 1000)]
    for neighbours, scores in results[1:]:
        np.testing.assert_array_equal(neighbours, results[0][0])
        np.testing.assert_array_equal(scores, results[0][1])
    assert_table_exact(table, 9, 7, reference)
    assert_table_exact(table, 39, 3, reference)


def test_many_identical_rows_tie_beyond_k():
    """150 copies of one row: every copy has 149 others at score 1, so the k-th score is shared far beyond k."""
    table = unit_rows(400, 32, seed=5)
    table[np.arange(0, 300, 2)] = table[1]
    assert_table_exact(table, 5, 64)
    neighbours, scores = topk_table(table, 5, chunk_rows=64)
    copies = np.arange(0, 300, 2)
    np.testing.assert_array_equal(neighbours[0], [1, 2, 4, 6, 8])  # lower indices win the ties at score 1
    assert (scores[copies] >= np.float32(1 - 1e-3)).all()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("noise", [1e-2, 1e-3, 1e-4])
def test_clustered_near_ties_are_exact(dtype, noise):
    table = clustered_rows(500, 96, centres=4, noise=noise, seed=11, dtype=dtype)
    assert_table_exact(table, 25, 128)


@pytest.mark.slow
def test_moderate_size_and_progress():
    table = clustered_rows(3000, 384, centres=40, noise=0.3, seed=2)
    done = []
    neighbours, scores = topk_table(table, 20, chunk_rows=700, progress=done.append)
    assert sum(done) == 3000 and len(done) == 5
    ref_n, ref_s = brute_table(table, 20)
    np.testing.assert_array_equal(neighbours, ref_n)
    np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


@pytest.mark.parametrize(
    ("embeddings", "k", "chunk_rows", "message"),
    [
        (np.ones(8, np.float32), 3, 4, "2-D"),
        (np.ones((4, 8), np.int32), 3, 4, "float16, float32 or float64"),
        (np.ones((0, 8), np.float32), 3, 4, "at least one row"),
        (np.full((4, 8), np.nan, np.float32), 3, 4, "NaN"),
        (np.ones((4, 8), np.float32), 0, 4, "k must be at least 1"),
        (np.ones((4, 8), np.float32), -2, 4, "k must be at least 1"),
        (np.ones((4, 8), np.float32), 2.5, 4, "k must be an integer"),
        (np.ones((4, 8), np.float32), 2, 0, "chunk_rows must be at least 1"),
    ],
)
def test_table_bad_inputs(embeddings, k, chunk_rows, message):
    with pytest.raises(ValueError, match=message):
        topk_table(embeddings, k, chunk_rows=chunk_rows)


# ---------------------------------------------------------------------------------------------
# ExactSearch
# ---------------------------------------------------------------------------------------------


def queries_near(table: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Half random unit queries, half small perturbations of stored rows (close to many near-ties)."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((count, table.shape[1]))
    half = count // 2
    q[:half] = table[rng.integers(0, len(table), half)].astype(np.float64) + 1e-3 * q[:half]
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def assert_search_exact(search: ExactSearch, table: np.ndarray, query, k) -> None:
    idx, scores = search.search(query, k)
    ref_i, ref_s = brute_search(table, query, k)
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_search_on_readonly_memmap_equals_brute_force(tmp_path, dtype):
    table = clustered_rows(2000, 256, centres=30, noise=0.2, seed=4, dtype=dtype)
    table[[10, 500, 1999]] = table[3]  # duplicates of row 3
    np.save(tmp_path / "embeddings.npy", table)
    stored = np.load(tmp_path / "embeddings.npy", mmap_mode="r")
    search = ExactSearch(stored)
    assert search._sketch is not None  # the int8 prefilter runs
    for i, query in enumerate(queries_near(table, 40, seed=dtype().itemsize)):
        assert_search_exact(search, table, query, k=1 + i % 25)
    own = table[3].astype(np.float32)
    assert_search_exact(search, table, own, 5)  # itself and its duplicates tie at the top
    idx, _ = search.search(own, 4)
    np.testing.assert_array_equal(idx, [3, 10, 500, 1999])
    assert_search_exact(search, table, own, 5000)  # k capped to N


def test_search_matches_the_table_rows():
    table = unit_rows(600, 128, seed=9)
    neighbours, scores = topk_table(table, 10)
    search = ExactSearch(table)
    for i in range(0, 600, 37):
        idx, sc = search.search(table[i].astype(np.float32), 11)  # the row itself first, then its table
        np.testing.assert_array_equal(idx[1:], neighbours[i])
        np.testing.assert_array_equal(sc[1:], scores[i])


def test_search_from_many_threads():
    table = unit_rows(3000, 192, seed=8)
    search = ExactSearch(table)
    queries = queries_near(table, 64, seed=1)
    expected = [brute_search(table, q, 10) for q in queries]

    def run(i: int):
        return search.search(queries[i], 10)

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, list(range(64)) * 3))
    for n, (idx, scores) in enumerate(results):
        ref_i, ref_s = expected[n % 64]
        np.testing.assert_array_equal(idx, ref_i)
        np.testing.assert_array_equal(scores, ref_s.astype(np.float32))


def test_search_of_scaled_zero_and_large_queries_and_rows(monkeypatch):
    table = unit_rows(500, 64, seed=12, dtype=np.float64)
    search = ExactSearch(table)
    assert search._sketch is not None  # the int8 prefilter runs
    query = queries_near(table, 2, seed=3)[0]
    assert_search_exact(search, table, query, 10)
    assert_search_exact(search, table, query * 1e6, 3)  # scaled queries: the prefilter sees q / |q|
    assert_search_exact(search, table, np.zeros(64, np.float32), 5)  # all scores tie at 0: lowest rows
    big = (unit_rows(300, 16, seed=2, dtype=np.float32) * 1e5).astype(np.float32)  # beyond float16 range
    big_search = ExactSearch(big)
    assert big_search._sketch is not None  # the int8 prefilter runs
    assert_search_exact(big_search, big, query[:16] / np.linalg.norm(query[:16]), 7)


def test_search_without_prefilter_stays_exact(monkeypatch):
    """Tables whose int8 sums could overflow int32 are scanned in float64 (here: the limit lowered)."""
    monkeypatch.setattr(knn, "sketch_fits", lambda dim: False)
    table = clustered_rows(700, 96, centres=5, noise=0.1, seed=5)
    search = ExactSearch(table)
    assert search._sketch is None  # a full float64 scan
    for query in queries_near(table, 6, seed=4):
        assert_search_exact(search, table, query, 12)


def test_a_kernel_with_wrong_sums_is_not_used(monkeypatch):
    """An integer kernel that is off by one anywhere in the probe is refused: every search scans in float64."""
    real = sketch._kernel()

    class OffByOne:
        @staticmethod
        def cdist(a, b, **kwargs):
            out = np.asarray(real.cdist(a, b, **kwargs), dtype=np.float64)
            out[..., -1] += 1
            return out

    monkeypatch.setattr(sketch, "_kernel", lambda: OffByOne)
    table = unit_rows(800, 384, seed=6)
    search = ExactSearch(table)
    assert search._sketch is None  # a full float64 scan
    for query in queries_near(table, 4, seed=2):
        assert_search_exact(search, table, query, 10)


def test_search_single_row():
    search = ExactSearch(unit_rows(1, 8))
    idx, scores = search.search(unit_rows(1, 8, seed=1)[0].astype(np.float32), 3)
    assert idx.tolist() == [0] and scores.shape == (1,)


@pytest.mark.parametrize(
    ("query", "k", "message"),
    [
        (np.ones(7, np.float32), 3, r"shape \(8,\)"),
        (np.ones((1, 8), np.float32), 3, r"shape \(8,\)"),
        (np.full(8, np.nan, np.float32), 3, "NaN"),
        (np.ones(8, np.float32), 0, "k must be at least 1"),
        (np.array(["a"] * 8), 3, "real-valued"),
    ],
)
def test_search_bad_inputs(query, k, message):
    search = ExactSearch(unit_rows(50, 8))
    with pytest.raises(ValueError, match=message):
        search.search(query, k)


def test_search_bad_table():
    with pytest.raises(ValueError, match="NaN"):
        ExactSearch(np.full((3, 4), np.inf, np.float16))
    with pytest.raises(ValueError, match="2-D"):
        ExactSearch(np.ones(4, np.float16))
