"""Benchmark of the exact kNN (core/knn.py) against plain numpy float32, at the real catalogue size.

    python -m bench.knn [--n N] [--dim 1536] [--k 100] [--dtype float16] [--queries 200] [--torch-threads T]

Embeddings are seeded random unit vectors (the worst case for near-ties: all scores crowd around 0);
N defaults to the number of games in the Steam catalogue (``../shared/data/steam_catalog_2021.json``
next to the repository, else 29,982). Prints one table:

- the full neighbour table: ``topk_table`` vs a plain numpy float32 brute force (chunked matrix
  products + argpartition, not exact), as a ratio, and vs faiss ``IndexFlatIP`` (k + 1, then the row
  itself dropped) with their agreement. faiss is optional (``bench/requirements.txt``).
- one query: ``ExactSearch.search`` (on a read-only memmap, as the service has it) vs a plain numpy
  float32 matrix-vector product + argpartition (on a float32 copy), p50/p99 over random queries, the
  ratio of the medians, and how often the plain version's top k differs from the exact one.

Each loop runs alone (interleaved, each one's thread pool would still be spinning when the other
starts); the pair is measured twice, in alternation, and the medians pool both rounds.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import skip_exit_collection
from core.cpu import cpu_cores
from core.knn import ExactSearch, topk_table

ROOT = Path(__file__).resolve().parent.parent


CATALOG = ROOT.parent / "shared" / "data" / "steam_catalog_2021.json"
FALLBACK_N = 29_982


def catalog_size() -> tuple[int, str]:
    try:
        return len(json.loads(CATALOG.read_text())), f"games in {CATALOG.name}"
    except (OSError, ValueError):
        return FALLBACK_N, "synthetic (catalogue file not found)"


def unit_vectors(n: int, dim: int, dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):  # bounded temporaries
        part = rng.standard_normal((min(8192, n - start), dim), dtype=np.float32)
        x[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return x.astype(dtype)


def faiss_table(table: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float] | str:
    """faiss's exact inner-product search of every row, k + 1 results with the row itself dropped."""
    try:
        import faiss
    except ImportError:
        return "faiss not installed (pip install -r bench/requirements.txt)"
    x = np.ascontiguousarray(table, dtype=np.float32)
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, ids = index.search(x, k + 1)
    n = len(x)
    is_self = ids == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)  # the row itself, else the last
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop] = False
    elapsed = time.perf_counter() - t0
    return ids[keep].reshape(n, k), scores[keep].reshape(n, k), elapsed


def percentiles(times: list[float]) -> str:
    ms = np.array(times) * 1e3
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms"


def timed(run, queries: np.ndarray) -> tuple[list[float], list[np.ndarray]]:
    """Seconds per query and the results, after a few warm-up calls."""
    for q in queries[:5]:
        run(q)
    times, results = [], []
    for q in queries:
        t0 = time.perf_counter()
        results.append(run(q))
        times.append(time.perf_counter() - t0)
    return times, results


def numpy_topk(table32: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = table32 @ query
    top = np.argpartition(-scores, k - 1)[:k]
    return top[np.argsort(-scores[top], kind="stable")]


def numpy_table(table: np.ndarray, k: int, chunk_rows: int = 512) -> float:
    """Seconds for the plain float32 table: each chunk's products, the row itself dropped, top k sorted."""
    t0 = time.perf_counter()
    x = np.ascontiguousarray(table, dtype=np.float32)
    for start in range(0, len(x), chunk_rows):
        block = x[start : start + chunk_rows] @ x.T
        block[np.arange(len(block)), np.arange(start, start + len(block))] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        np.argsort(-np.take_along_axis(block, top, axis=1), axis=1)
    return time.perf_counter() - t0


def ratio(ours: float, baseline: float) -> str:
    return f"{ours / baseline:8.2f} x the numpy float32 time"


def main() -> None:
    args, n, n_source = parse_args()
    torch.set_num_threads(args.torch_threads or max(1, cpu_cores() // 2))
    table = unit_vectors(n, args.dim, args.dtype, args.seed)
    print(f"N = {n} ({n_source}), D = {args.dim}, k = {args.k}, {args.dtype}, torch threads {torch.get_num_threads()}")
    rows = table_rows(table, args.k) + query_rows(table, args)
    width = max(len(name) for name, _ in rows)
    print("-" * (width + 32))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    skip_exit_collection()


def parse_args() -> tuple[argparse.Namespace, int, str]:
    """The options, the number of rows and where that number comes from."""
    n_default, n_source = catalog_size()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help=f"rows (default: {n_default}, {n_source})")
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--k", type=int, default=100, help="neighbours per row in the table")
    parser.add_argument("--query-k", type=int, default=10, help="results per single query")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: cores / 2, as in each of 2 workers")
    args = parser.parse_args()
    if args.n:
        return args, args.n, "--n"
    return args, n_default, n_source


def table_rows(table: np.ndarray, k: int) -> list[tuple[str, str]]:
    """The whole table's top k: ours against numpy float32 and, when installed, faiss."""
    t0 = time.perf_counter()
    neighbours, scores = topk_table(table, k)
    ours = time.perf_counter() - t0
    plain = numpy_table(table, k)
    rows = [
        ("topk_table, all rows (exact)", f"{ours:8.2f} s"),
        ("numpy float32 table (not exact)", f"{plain:8.2f} s"),
        ("  topk_table / numpy", ratio(ours, plain)),
    ]
    result = faiss_table(table, k)
    if isinstance(result, str):
        rows.append(("faiss IndexFlatIP, all rows", result))
    else:
        f_ids, f_scores, f_time = result
        same = float((f_ids == neighbours).all(axis=1).mean())
        diff = float(np.abs(f_scores.astype(np.float64) - scores).max())
        rows.append(("faiss IndexFlatIP, all rows", f"{f_time:8.2f} s"))
        rows.append(("  identical neighbour lists", f"{same:8.2%}"))
        rows.append(("  max score difference", f"{diff:10.2e}"))
    return rows


def query_rows(table: np.ndarray, args: argparse.Namespace) -> list[tuple[str, str]]:
    """Single queries: ExactSearch over the stored (memory-mapped) table against the numpy matvec."""
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "embeddings.npy", table)
        stored = np.load(Path(tmp) / "embeddings.npy", mmap_mode="r")
        t0 = time.perf_counter()
        search = ExactSearch(stored)
        build = time.perf_counter() - t0
        rng = np.random.default_rng(args.seed + 1)
        queries = rng.standard_normal((args.queries, args.dim)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        table32 = np.ascontiguousarray(table, dtype=np.float32)
        exact_t, plain_t, exact_idx, plain_idx = [], [], [], []
        for _ in range(2):
            t, exact_idx = timed(lambda q: search.search(q, args.query_k)[0], queries)
            exact_t += t
            t, plain_idx = timed(lambda q: numpy_topk(table32, q, args.query_k), queries)
            plain_t += t
        differ = sum(not np.array_equal(a, b) for a, b in zip(exact_idx, plain_idx, strict=True))
    return [
        ("ExactSearch build (int8 sketch of the memmap)", f"{build:8.2f} s"),
        (f"ExactSearch.search, k={args.query_k}", percentiles(exact_t)),
        ("numpy float32 matvec + argpartition", percentiles(plain_t)),
        ("  ExactSearch / numpy, medians", ratio(float(np.median(exact_t)), float(np.median(plain_t)))),
        ("  top-k lists differing from exact", f"{differ} / {len(queries)}"),
    ]


if __name__ == "__main__":
    main()
