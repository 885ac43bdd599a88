"""Optional mirror/flip tables (``--variants mirror,flip``): each banner transformed, embedded, and searched.

For every requested variant ("mirror", "flip", "mirror+flip") and strategy, the builder embeds the
transformed banners (``build.py``, cached like the plain ones under ``variant_key``, so an interrupted
build resumes) and computes each one's exact top-k among the plain embeddings (a float64 brute force),
the game itself excluded: ``GET /match/<appid>?mirror=1`` then reads a table, like a plain lookup.
"""

from __future__ import annotations

import hashlib

import numpy as np

from core.index import IndexWriter, write_variant
from core.knn_device import topk_table_device


def variant_key(strategy_key: str, variant: str) -> str:
    """The cache key of a strategy's embeddings of a variant (the plain key for "")."""
    if not variant:
        return strategy_key
    return hashlib.sha256(f"{strategy_key}|{variant}".encode()).hexdigest()[:20]


def write_variants(writer: IndexWriter, cfg, strategy, emb: np.ndarray, key: str, row_shas, cache) -> dict:
    """Compute and write a strategy's variant tables; returns the manifest's "variants" entry."""
    entries = {}
    for variant in cfg.variants:
        vkey = variant_key(key, variant)
        queries = np.stack([cache.get(vkey, h) for h in row_shas]).astype(cfg.dtype)
        nbr, sco = topk_table_device(emb, cfg.k, "cpu", queries=queries, chunk_rows=256)
        entries[variant] = write_variant(writer, strategy.name, variant, queries, nbr, sco)
    return entries
