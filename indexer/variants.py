"""Optional mirror/flip tables (``--variants mirror,flip``): each banner transformed, embedded, and searched.

For every requested variant ("mirror", "flip", "mirror+flip") and strategy, the builder embeds the
transformed banners (``build.py``, cached like the plain ones under ``variant_key``, so an interrupted
build resumes) and computes each one's exact top-k among the plain embeddings, the game itself
excluded: ``GET /match/<appid>?mirror=1`` then reads a table, like a plain lookup.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from core.index import IndexWriter, write_variant
from core.knn_device import best_k


def variant_key(strategy_key: str, variant: str) -> str:
    """The cache key of a strategy's embeddings of a variant (the plain key for "")."""
    if not variant:
        return strategy_key
    return hashlib.sha256(f"{strategy_key}|{variant}".encode()).hexdigest()[:20]


def variant_tables(queries: np.ndarray, table: np.ndarray, k: int, chunk_rows: int = 256) -> tuple[np.ndarray, ...]:
    """Each query row's k best rows of ``table`` (its own row excluded), exactly: a float64 brute force.

    Neighbours best first, ties by the lower row, scores rounded to float32, as ``core.knn.topk_table``.
    """
    n = table.shape[0]
    k = min(k, n - 1)
    base = np.asarray(table, dtype=np.float64)
    nbr = np.empty((len(queries), k), dtype=np.int32)
    sco = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), chunk_rows):
        block = np.asarray(queries[start : start + chunk_rows], dtype=np.float64) @ base.T
        rows = np.arange(block.shape[0])
        block[rows, rows + start] = -np.inf
        cols, vals = best_k(torch.from_numpy(block), k)  # the device tables' exact top k, here on the CPU
        nbr[start : start + len(rows)] = cols.numpy()
        sco[start : start + len(rows)] = vals.numpy()
    return nbr, sco


def write_variants(writer: IndexWriter, cfg, strategy, emb: np.ndarray, key: str, row_shas, cache) -> dict:
    """Compute and write a strategy's variant tables; returns the manifest's "variants" entry."""
    entries = {}
    for variant in cfg.variants:
        vkey = variant_key(key, variant)
        queries = np.stack([cache.get(vkey, h) for h in row_shas]).astype(cfg.dtype)
        nbr, sco = variant_tables(queries, emb, cfg.k)
        entries[variant] = write_variant(writer, strategy.name, variant, queries, nbr, sco)
    return entries
