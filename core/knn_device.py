"""Exact neighbour tables on any torch device: a float64 brute force of the stored values (cheap on a GPU), so no
prefilter or error bound is needed, and the result is ``core.knn.topk_table``'s table."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from core.knn import check_count, check_table

_CHUNK_BYTES = 1 << 30  # float64 scores of one chunk of rows against all rows


def topk_table_device(
    embeddings: np.ndarray,
    k: int,
    device: str | torch.device,
    *,
    queries: np.ndarray | None = None,
    chunk_rows: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``topk_table``'s result, computed on ``device``; with ``queries`` (Q, D), those rows' tables against the
    embeddings instead (row i still excludes row i)."""
    table = check_table(embeddings)
    k = min(check_count(k, "k"), table.shape[0] - 1)
    n = table.shape[0]
    x = torch.from_numpy(np.require(table, requirements="CW")).to(device).double()  # read-only tables: copied
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        raise ValueError(f"embeddings contain NaN or infinite values (row {int(torch.nonzero(~finite)[0, 0])})")
    if float(torch.linalg.vector_norm(x, dim=1).max()) > 1e18:
        raise ValueError("embeddings must be L2-normalised")
    q = x if queries is None else torch.from_numpy(np.require(queries, requirements="CW")).to(device).double()
    rows = q.shape[0]
    if k == 0:
        if progress is not None:
            progress(rows)
        return np.empty((rows, 0), dtype=np.int32), np.empty((rows, 0), dtype=np.float32)
    step = chunk_rows or max(1, min(rows, _CHUNK_BYTES // (8 * n)))
    neighbours, scores = [], []
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = q[start:stop] @ x.T
        local = torch.arange(stop - start, device=block.device)
        block[local, local + start] = -torch.inf  # never the row itself
        cols, vals = best_k(block, k)
        neighbours.append(cols.to(torch.int32).cpu())
        scores.append(vals.float().cpu())
        if progress is not None:
            progress(stop - start)
    return torch.cat(neighbours).numpy(), torch.cat(scores).numpy()


def best_k(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k best columns by (-score, column): top k + margin, then an exact order of those; a row whose
    last kept candidate ties with its k-th best may have left tied columns out, so it is sorted in full."""
    n = block.shape[1]
    c = min(n - 1, k + max(16, k // 4))
    vals, cols = torch.topk(block, c, dim=1)
    cols, order = torch.sort(cols, dim=1)  # by column first, so that the stable sort breaks ties by column
    vals = torch.gather(vals, 1, order)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    cols = torch.gather(cols, 1, order)
    ambiguous = torch.nonzero(vals[:, c - 1] == vals[:, k - 1]).flatten() if c < n - 1 else None
    vals, cols = vals[:, :k].clone(), cols[:, :k].clone()
    if ambiguous is not None and ambiguous.numel():
        full_vals, full_cols = torch.sort(block[ambiguous], dim=1, descending=True, stable=True)
        vals[ambiguous], cols[ambiguous] = full_vals[:, :k], full_cols[:, :k]
    return cols, vals
