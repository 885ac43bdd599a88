"""Building an index folder: banners in, embeddings and exact neighbour tables out.

The steps, each safe to interrupt:

1. check the inputs (folder, apps list, strategies, options): bad input stops
   here, before anything is written;
2. resolve each backbone's checkpoint (cache, download or ``--weights``) and
   hash it; hash every banner (in threads);
3. embed what the cache lacks, batch by batch, each batch persisted at once
   (see ``cache.py``) by a writer thread while the next batch runs; unreadable
   images are skipped and recorded; on CUDA, banners are decoded on the GPU
   (``core.dino.device_input``);
4. for every strategy, store the embeddings (float16 by default) and compute
   the exact top-k tables over the stored values (``core.knn``; on CUDA a
   float64 brute force on the GPU, ``core.knn_device``);
5. write it all to a staging folder and swap it into place (``writer.py``).
"""

from __future__ import annotations

import platform
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.apps import load_apps
from core.cpu import cpu_cores
from core.dino.extract import (
    Extractor,
    configure_threads,
    default_batch_size,
    default_device,
    default_precision,
)
from core.dino.strategies import Strategy
from core.dino.timing import StageTimer, UtilisationSampler
from core.dino.weights import MODELS, checkpoint_url, resolve_checkpoint
from core.files import os_error_words, sha256_file, sha256_files
from core.index import APPS, IndexWriter, make_manifest, recover, write_strategy
from core.knn import topk_table
from core.knn_device import topk_table_device

from .cache import EmbeddingCache, strategy_key
from .sources import Source, SourceError, plan_sources
from .variants import embed_variants, write_variants

DTYPES = ("float16", "float32")


@dataclass
class BuildConfig:
    images: Path
    out: Path
    strategies: list[Strategy]
    k: int = 100
    apps_file: Path | None = None
    batch_size: int | None = None
    device: str | None = None
    weights: dict[str, Path] = field(default_factory=dict)
    num_workers: int | None = None
    threads: int | None = None
    dtype: str = "float16"
    precision: str | None = None  # default_precision(device)
    decode: str | None = None  # "cpu" or "device"; default: the extractor's (device on CUDA)
    progress: bool = True
    variants: list[str] = field(default_factory=list)  # mirror/flip query tables (indexer/variants.py)
    ray: str | None = None  # embed on this Ray cluster ("": a local instance; indexer/ray_embed.py)


@dataclass
class BuildSummary:
    out: Path
    rows: int
    strategies: list[str]
    embedded: int
    reused: int
    skipped: list[dict]
    missing_images: int
    seconds: float
    embed_seconds: float
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    gpu_utilisation: float | None = None

    def breakdown(self) -> str:
        """Where the time went: one line, stages in order (decoding overlaps the forwards on the device path)."""
        t = self.timings
        parts = [f"{name} {t[name]:.2f} s" for name in ("hashing", "models") if name in t]
        embed = [f"{name} {v:.2f} s" for name, v in t.items() if name.startswith(("decoding", "forwards"))]
        counts = ", ".join(f"{v} {k}" for k, v in self.counts.items() if v)
        if "embedding" in t:
            inner = "; ".join(embed + ([counts] if counts else []))
            parts.append(f"embedding {t['embedding']:.2f} s" + (f" ({inner})" if inner else ""))
        parts += [f"{name} {t[name]:.2f} s" for name in ("tables", "writing") if name in t]
        if self.gpu_utilisation is not None:
            parts.append(f"GPU busy {self.gpu_utilisation:.0f}% while embedding")
        return "time: " + ", ".join(parts)

    def line(self) -> str:
        rate = f"{self.embedded / self.embed_seconds:.1f} images/s" if self.embedded and self.embed_seconds else "-"
        return (
            f"index: {self.rows} images ({self.embedded} embedded, {self.reused} reused, {len(self.skipped)} skipped"
            f"{f', {self.missing_images} listed apps without a banner' if self.missing_images else ''}), "
            f"{len(self.strategies)} strategies ({', '.join(self.strategies)}) in {self.seconds:.1f} s, "
            f"embedding at {rate} -> {self.out}"
        )


def _check_config(cfg: BuildConfig) -> None:
    if not cfg.strategies:
        raise SourceError("no strategy to build")
    if cfg.k < 1:
        raise SourceError(f"--k must be at least 1, got {cfg.k}")
    if cfg.dtype not in DTYPES:
        raise SourceError(f"--dtype must be one of {', '.join(DTYPES)}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise SourceError("--batch-size must be at least 1")
    codes = {s.backbone.code for s in cfg.strategies}
    unused = set(cfg.weights) - codes
    if unused:
        raise SourceError(f"--weights given for {sorted(unused)}, which no requested strategy uses ({sorted(codes)})")
    device = cfg.device or default_device()
    if device.startswith("cuda") and cfg.ray is None and not torch.cuda.is_available():
        raise SourceError("--device cuda: no CUDA device is available here")
    if cfg.ray is not None and (cfg.variants or cfg.decode == "device"):
        raise SourceError("--ray embeds plain banners decoded on CPUs: --variants and --decode device run without it")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise SourceError(f"--out {cfg.out} exists and is not a folder")


class BuildFailed(RuntimeError):
    """The build stopped (a full disk, an unwritable folder); the message says what became of the index."""


def build_index(cfg: BuildConfig) -> BuildSummary:
    start = time.perf_counter()
    cfg = _resolve_out(cfg)
    _check_config(cfg)
    apps = load_apps(cfg.apps_file) if cfg.apps_file else None
    plan = plan_sources(cfg.images, apps)
    if len(plan.sources) < 2:
        raise SourceError(
            f"{cfg.images}: {len(plan.sources)} usable banner(s); an index needs at least 2 "
            f"(files named <appid>.jpg/.jpeg/.png/.webp{', listed in --apps' if apps is not None else ''})"
        )
    device = cfg.device or default_device()
    if cfg.ray is not None:  # --device and --threads are the Ray actors'; the tables run here
        cfg = replace(cfg, device=_ray_embed().start(cfg.ray, cfg.device))
        device = default_device()
    configure_threads(None if cfg.ray is not None else cfg.threads)
    precision = cfg.precision or default_precision(cfg.device or device)
    timer = StageTimer(device)
    notes = []
    work = cfg.out.parent / f".{cfg.out.name}.work"
    try:
        with EmbeddingCache(work) as cache:
            note = recover(cfg.out)
            if note:
                notes.append(note)
            rows, skipped, embedded, embed_seconds, utilisation = _build_in(cfg, device, precision, plan, cache, timer)
            t0 = time.perf_counter()
            try:
                cache.consolidate()
            except OSError as e:  # the index is complete and in place; the cache's chunks are kept
                notes.append(
                    f"the new index is in place at {cfg.out}, but merging the embedding cache failed "
                    f"({os_error_words(e)}); the next build reads its chunks instead"
                )
            timer.add("writing", time.perf_counter() - t0)
    except OSError as e:
        raise BuildFailed(f"{os_error_words(e)}. {_previous_index_state(cfg.out)}") from e
    embedded = min(embedded, len(rows))
    return BuildSummary(
        out=cfg.out,
        rows=len(rows),
        strategies=[s.name for s in cfg.strategies],
        embedded=embedded,
        reused=len(rows) - embedded,
        skipped=skipped,
        missing_images=len(plan.missing_images),
        seconds=time.perf_counter() - start,
        embed_seconds=embed_seconds,
        notes=notes,
        timings=timer.totals(),
        counts=dict(timer.counts),
        gpu_utilisation=utilisation,
    )


def _resolve_out(cfg: BuildConfig) -> BuildConfig:
    """Write through symlinks to the real folder: the link stays a link, and builds given the link and
    the target share one lock (the lock and the staging folder live beside the real folder)."""
    real = cfg.out.resolve()
    return cfg if real == cfg.out.absolute() else replace(cfg, out=real)


def _previous_index_state(out: Path) -> str:
    """What a failed build left at ``out``, from the folder itself (the writer swaps it in last)."""
    if out.is_dir():
        return f"The index at {out} is unchanged; finished batches are kept: free some space and run again to resume."
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds:
        return f"The previous index is at {olds[-1]}; the next build puts it back first."
    return f"No index was written to {out}; finished batches are kept: run again to resume."


def _build_in(cfg: BuildConfig, device: str, precision: str, plan, cache: EmbeddingCache, timer: StageTimer):
    """Checkpoints, hashes, embeddings and the index, under the cache's lock.

    Returns (rows, skipped, embedded, embed_seconds, mean GPU utilisation).
    """
    checkpoints, ckpt_sha = {}, {}
    for s in cfg.strategies:
        code = s.backbone.code
        if code not in checkpoints:
            checkpoints[code] = resolve_checkpoint(s.backbone, cfg.weights.get(code), progress=cfg.progress)
            ckpt_sha[code] = sha256_file(checkpoints[code], cache=True)
    keys = {s.name: strategy_key(s.to_manifest(), ckpt_sha[s.backbone.code], precision) for s in cfg.strategies}
    preload = str(device).startswith("cuda") and cfg.ray is None
    with ThreadPoolExecutor(1, thread_name_prefix="models") as loader:
        if preload:  # load the models onto the GPU while the CPU hashes the banners
            loading = loader.submit(_load_models, cfg.strategies, device, checkpoints, ckpt_sha, timer)
        t0 = time.perf_counter()
        shas = sha256_files([src.path for src in plan.sources], workers=max(4, cpu_cores()))
        timer.add("hashing", time.perf_counter() - t0)
        if preload:
            loading.result()

    embed_start = time.perf_counter()
    with UtilisationSampler(device) as utilisation:
        embedded = _embed_missing(cfg, device, precision, plan.sources, shas, keys, checkpoints, ckpt_sha, cache, timer)
        embed_variants(cfg, device, precision, plan.sources, shas, keys, checkpoints, ckpt_sha, cache)
    embed_seconds = time.perf_counter() - embed_start

    rows = [i for i, h in enumerate(shas) if h not in cache.failed]
    skipped = [
        {"appid": plan.sources[i].appid, "file": plan.sources[i].path.name, "reason": cache.failed[h]}
        for i, h in enumerate(shas)
        if h in cache.failed
    ]
    for s in skipped:
        print(f"warning: skipped {s['file']}: {s['reason']}", file=sys.stderr)
    if len(rows) < 2:
        raise SourceError(f"{cfg.images}: fewer than 2 readable banners; nothing to index")
    _write_index(cfg, device, precision, plan, rows, shas, skipped, keys, checkpoints, ckpt_sha, cache, timer)
    return rows, skipped, embedded, embed_seconds, utilisation.mean


def _load_models(strategies, device, checkpoints, ckpt_sha, timer: StageTimer) -> None:
    """Put every backbone's model in the process-wide cache, where the Extractor finds it."""
    t0 = time.perf_counter()
    for code in dict.fromkeys(s.backbone.code for s in strategies):
        backbone = next(s.backbone for s in strategies if s.backbone.code == code)
        MODELS.get(backbone, checkpoints[code], device=device, expected_sha256=ckpt_sha[code], download=False)
    timer.add("models", time.perf_counter() - t0)


def missing(
    strategies: list[Strategy], shas: list[str], keys: dict[str, str], cache: EmbeddingCache
) -> tuple[list[Strategy], list[int]]:
    """The strategies the cache lacks some banner's features for, and those banners (indices into ``shas``);
    banners that failed before are not tried again."""
    todo_strategies = [
        s for s in strategies if any(h not in cache.failed and not cache.has(keys[s.name], h) for h in shas)
    ]
    todo = [
        i
        for i, h in enumerate(shas)
        if h not in cache.failed and any(not cache.has(keys[s.name], h) for s in todo_strategies)
    ]
    return todo_strategies, todo


def _embed_missing(
    cfg: BuildConfig,
    device: str,
    precision: str,
    sources: list[Source],
    shas: list[str],
    keys: dict[str, str],
    checkpoints: dict[str, Path],
    ckpt_sha: dict[str, str],
    cache: EmbeddingCache,
    timer: StageTimer,
) -> int:
    """Embed the banners the cache lacks for some strategy; returns how many were embedded (not failed)."""
    todo_strategies, todo = missing(cfg.strategies, shas, keys, cache)
    if not todo:
        return 0
    if cfg.ray is not None:
        paths = [src.path for src in sources]
        return _ray_embed().embed(cfg, precision, todo_strategies, paths, shas, keys, ckpt_sha, cache, timer)
    t0 = time.perf_counter()
    extractor = Extractor(
        todo_strategies,
        device=device,
        precision=precision,
        checkpoints=checkpoints,
        expected_sha256=ckpt_sha,
        download=False,
    )
    timer.add("models", time.perf_counter() - t0)
    batch_size = cfg.batch_size or default_batch_size(device)
    done = 0
    t0 = time.perf_counter()
    # One writer thread persists each batch while the next one runs; at most two wait to be written.
    with (
        tqdm(total=len(todo), unit="img", desc="embedding", disable=not cfg.progress, smoothing=0.1) as bar,
        ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as writer,
    ):
        writes: deque = deque()
        for batch in extractor.iter_files(
            [sources[i].path for i in todo],
            batch_size=batch_size,
            num_workers=cfg.num_workers,
            decode=cfg.decode,
            timer=timer,
        ):
            batch_shas = [shas[todo[j]] for j in batch.indices]
            features = {keys[name]: feats for name, feats in batch.features.items()}
            failed = {shas[todo[j]]: reason for j, reason in batch.failures}
            writes.append(writer.submit(cache.add_batch, batch_shas, features, failed))
            while len(writes) > 2:
                writes.popleft().result()
            bar.update(len(batch.indices) + len(batch.failures))
            done += len(batch.indices)
        while writes:
            writes.popleft().result()
    timer.add("embedding", time.perf_counter() - t0)
    return done


def _ray_embed():
    """indexer.ray_embed, imported only for --ray: Ray is an optional extra."""
    try:
        from . import ray_embed
    except ImportError as e:
        raise SourceError(f"--ray needs Ray: pip install '.[ray]' (or -r requirements-ray.txt); {e}") from None
    return ray_embed


def _write_index(cfg, device, precision, plan, rows, shas, skipped, keys, checkpoints, ckpt_sha, cache, timer):
    n = len(rows)
    t_start, t_tables = time.perf_counter(), 0.0
    apps = [{"appid": plan.sources[i].appid, "name": plan.sources[i].name} for i in rows]
    # Tables one after the other (on the GPU, or on every core), files written and hashed in threads meanwhile.
    with IndexWriter(cfg.out) as writer, ThreadPoolExecutor(4, thread_name_prefix="index-writer") as pool:
        apps_sha = writer.write_json(APPS, apps)
        writes = {}
        for s in cfg.strategies:
            key = keys[s.name]
            emb = np.stack([cache.get(key, shas[i]) for i in rows]).astype(cfg.dtype)
            t0 = time.perf_counter()
            with tqdm(total=n, unit="row", desc=f"neighbours {s.name}", disable=not cfg.progress) as bar:
                if str(device).startswith("cuda"):
                    neighbours, scores = topk_table_device(emb, min(cfg.k, n - 1), device, progress=bar.update)
                else:
                    neighbours, scores = topk_table(emb, min(cfg.k, n - 1), progress=bar.update)
            t_tables += time.perf_counter() - t0
            code = s.backbone.code
            checkpoint = {"file": checkpoints[code].name, "sha256": ckpt_sha[code], "url": checkpoint_url(s.backbone)}
            variants = write_variants(writer, cfg, s, emb, key, [shas[i] for i in rows], cache) if cfg.variants else {}
            writes[s.name] = pool.submit(
                write_strategy,
                writer,
                s,
                emb,
                neighbours,
                scores,
                checkpoint,
                precision=precision,
                cache_key=key,
                **({"variants": variants} if variants else {}),
            )
        entries = {name: future.result() for name, future in writes.items()}
        manifest = make_manifest(
            n,
            apps_sha,
            cfg.dtype,
            entries,
            skipped_images=skipped,
            missing_images=plan.missing_images,
            variants=cfg.variants,
            build={"device": device, "torch": torch.__version__, "python": platform.python_version()},
        )
        writer.commit(manifest)
    timer.add("tables", t_tables)
    timer.add("writing", time.perf_counter() - t_start - t_tables)
