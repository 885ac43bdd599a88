"""Building an index folder: banners in, embeddings and exact neighbour tables out.

Each step is safe to interrupt: the inputs checked (bad input stops before anything is written); checkpoints and
banners hashed; what the cache lacks embedded (plain, then each mirror/flip variant; decoded on the GPU on CUDA),
each batch persisted at once (``cache.py``) while the next one runs; per strategy, the exact top-k tables over the
stored embeddings (``core.knn``, or a float64 brute force on CUDA) and each variant's top-k among the plain ones;
all written to a staging folder and swapped into place (``core.index``).
"""

from __future__ import annotations

import platform
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from core.apps import load_apps
from core.cpu import cpu_cores
from core.dino.extract import Extractor, configure_threads, default_batch_size, default_device, default_precision
from core.dino.strategies import Strategy
from core.dino.timing import StageTimer, UtilisationSampler
from core.dino.weights import MODELS, checkpoint_url, resolve_checkpoint
from core.files import os_error_words, sha256_file, sha256_files
from core.index import APPS, MANIFEST, IndexWriter, make_manifest, recover, write_strategy, write_variant
from core.index.layout import EMBEDDING_DTYPES
from core.knn import topk_table
from core.knn_device import topk_table_device
from core.variants import apply_variant

from .cache import EmbeddingCache, strategy_key, variant_key
from .sources import SourceError, SourcePlan, plan_sources


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
    variants: list[str] = field(default_factory=list)  # mirror/flip query tables
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
    notes: list[str]
    timer: StageTimer
    gpu_utilisation: float | None

    def breakdown(self) -> str:
        """Where the time went: one line, stages in order (decoding overlaps the forwards on the device path)."""
        t = self.timer.totals()
        parts = [f"{name} {t[name]:.2f} s" for name in ("hashing", "models") if name in t]
        embed = [f"{name} {v:.2f} s" for name, v in t.items() if name.startswith(("decoding", "forwards"))]
        counts = ", ".join(f"{v} {k}" for k, v in self.timer.counts.items() if v)
        if "embedding" in t:
            inner = "; ".join(embed + ([counts] if counts else []))
            parts.append(f"embedding {t['embedding']:.2f} s" + (f" ({inner})" if inner else ""))
        parts += [f"{name} {t[name]:.2f} s" for name in ("tables", "writing") if name in t]
        if self.gpu_utilisation is not None:
            parts.append(f"GPU busy {self.gpu_utilisation:.0f}% while embedding")
        return "time: " + ", ".join(parts)

    def line(self) -> str:
        rate = f"{self.embedded / self.embed_seconds:.1f} images/s" if self.embedded and self.embed_seconds else "-"
        missing = f", {self.missing_images} listed apps without a banner" if self.missing_images else ""
        return (
            f"index: {self.rows} images ({self.embedded} embedded, {self.reused} reused, {len(self.skipped)} skipped"
            f"{missing}), {len(self.strategies)} strategies ({', '.join(self.strategies)}) in {self.seconds:.1f} s, "
            f"embedding at {rate} -> {self.out}"
        )


def _check_config(cfg: BuildConfig) -> None:
    if not cfg.strategies:
        raise SourceError("no strategy to build")
    if cfg.k < 1:
        raise SourceError(f"--k must be at least 1, got {cfg.k}")
    if cfg.dtype not in EMBEDDING_DTYPES:
        raise SourceError(f"--dtype must be one of {', '.join(EMBEDDING_DTYPES)}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise SourceError("--batch-size must be at least 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise SourceError(f"--threads must be at least 1, got {cfg.threads}")
    if cfg.num_workers is not None and cfg.num_workers < 0:
        raise SourceError(f"--workers must be at least 0, got {cfg.num_workers}")
    codes = {s.backbone.code for s in cfg.strategies}
    unused = set(cfg.weights) - codes
    if unused:
        raise SourceError(f"--weights given for {sorted(unused)}, which no requested strategy uses ({sorted(codes)})")
    if (cfg.device or default_device()).startswith("cuda") and cfg.ray is None and not torch.cuda.is_available():
        raise SourceError("--device cuda: no CUDA device is available here")
    if cfg.ray is not None and (cfg.variants or cfg.decode == "device"):
        raise SourceError("--ray embeds plain banners decoded on CPUs: --variants and --decode device run without it")
    if cfg.out.exists() and not cfg.out.is_dir():
        raise SourceError(f"--out {cfg.out} exists and is not a folder")
    above = next((p for p in cfg.out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise SourceError(f"--out {cfg.out}: {above} is not a folder")
    # The build replaces its --out wholesale: never a folder holding the banners, nor one that is not an index.
    out, images = cfg.out.resolve(), cfg.images.resolve()
    if out == images or out in images.parents:
        raise SourceError(f"--out {cfg.out} would replace the banners of --images {cfg.images}: give another folder")
    if cfg.out.is_dir() and not (cfg.out / MANIFEST).is_file() and any(cfg.out.iterdir()):
        raise SourceError(
            f"--out {cfg.out} is a folder that holds no index (no {MANIFEST}), which the build would replace: "
            "give a new folder, an empty one, or an index"
        )


class BuildFailed(RuntimeError):
    """The build stopped (a full disk, an unwritable folder); the message says what became of the index."""


def build_index(cfg: BuildConfig) -> BuildSummary:
    start = time.perf_counter()
    real = cfg.out.resolve()  # through symlinks: builds given the link and its target share one lock
    cfg = cfg if real == cfg.out.absolute() else replace(cfg, out=real)
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
        ray_device, actors = _ray_embed().start(cfg.ray, cfg.device, cfg.num_workers, cfg.threads or 1)
        cfg = replace(cfg, device=ray_device, num_workers=actors)
        device = default_device()
    configure_threads(None if cfg.ray is not None else cfg.threads)
    precision = cfg.precision or default_precision(cfg.device or device)
    try:
        with EmbeddingCache(cfg.out.parent / f".{cfg.out.name}.work") as cache:
            run = _Build(cfg, device, precision, plan, cache, StageTimer(device))
            note = recover(cfg.out)
            run.notes += [note] if note else []
            run.build()
            t0 = time.perf_counter()
            try:
                cache.consolidate()
            except OSError as e:  # the index is complete and in place; the cache's chunks are kept
                run.notes.append(
                    f"the new index is in place at {cfg.out}, but merging the embedding cache failed "
                    f"({os_error_words(e)}); the next build reads its chunks instead"
                )
            run.timer.add("writing", time.perf_counter() - t0)
    except OSError as e:
        raise BuildFailed(f"{os_error_words(e)}. {_previous_index_state(cfg.out)}") from e
    embedded = min(run.embedded, len(run.rows))
    return BuildSummary(
        out=cfg.out,
        rows=len(run.rows),
        strategies=[s.name for s in cfg.strategies],
        embedded=embedded,
        reused=len(run.rows) - embedded,
        skipped=run.skipped,
        missing_images=len(plan.missing_images),
        seconds=time.perf_counter() - start,
        embed_seconds=run.embed_seconds,
        notes=run.notes,
        timer=run.timer,
        gpu_utilisation=run.utilisation,
    )


def missing(
    strategies: list[Strategy], shas: list[str], keys: dict[str, str], cache: EmbeddingCache
) -> tuple[list[Strategy], list[int]]:
    """The strategies the cache lacks some banner's features (or attention map, where ``keys`` names one) for, and
    those banners (indices into ``shas``); banners that failed before are not tried again."""

    def lacks(s: Strategy, h: str) -> bool:
        names = (n for n in (s.name, s.attention_name) if n in keys)
        return h not in cache.failed and not all(cache.get(keys[n], h) is not None for n in names)

    lacking = [s for s in strategies if any(lacks(s, h) for h in shas)]
    return lacking, [i for i, h in enumerate(shas) if any(lacks(s, h) for s in lacking)]


def _ray_embed():
    """indexer.ray_embed, imported only for --ray: Ray is an optional extra."""
    try:
        from . import ray_embed
    except ImportError as e:
        raise SourceError(f"--ray needs Ray: pip install '.[ray]' (or -r requirements-ray.txt); {e}") from None
    return ray_embed


def _previous_index_state(out: Path) -> str:
    """What a failed build left at ``out``, from the folder itself (the writer swaps it in last)."""
    if out.is_dir():
        return f"The index at {out} is unchanged; finished batches are kept: free some space and run again to resume."
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds:
        return f"The previous index is at {olds[-1]}; the next build puts it back first."
    return f"No index was written to {out}; finished batches are kept: run again to resume."


@dataclass
class _Build:
    """One build under the cache's lock: checkpoints, hashes, embeddings, then the index."""

    cfg: BuildConfig
    device: str
    precision: str
    plan: SourcePlan
    cache: EmbeddingCache
    timer: StageTimer
    notes: list[str] = field(default_factory=list)
    checkpoints: dict[str, Path] = field(default_factory=dict)
    ckpt_sha: dict[str, str] = field(default_factory=dict)
    shas: list[str] = field(default_factory=list)  # of each source's bytes
    keys: dict[str, str] = field(default_factory=dict)  # strategy name -> cache key
    rows: list[int] = field(default_factory=list)  # the sources that made it into the index
    skipped: list[dict] = field(default_factory=list)
    embedded: int = 0
    embed_seconds: float = 0.0
    utilisation: float | None = None

    def build(self) -> None:
        self._prepare()
        t0 = time.perf_counter()
        with UtilisationSampler(self.device) as utilisation:
            self.embedded = self._embed_missing()
            for variant in self.cfg.variants:
                self._embed_missing(variant)
        self.embed_seconds, self.utilisation = time.perf_counter() - t0, utilisation.mean
        failed = self.cache.failed
        for i, h in enumerate(self.shas):
            if h not in failed:
                self.rows.append(i)
                continue
            source = self.plan.sources[i]
            self.skipped.append({"appid": source.appid, "file": source.path.name, "reason": failed[h]})
            print(f"warning: skipped {source.path.name}: {failed[h]}", file=sys.stderr)
        if len(self.rows) < 2:
            raise SourceError(f"{self.cfg.images}: fewer than 2 readable banners; nothing to index")
        self._write_index()

    def _prepare(self) -> None:
        """Checkpoints and their sha256, the cache keys, every banner's sha256 (models loaded onto a GPU meanwhile)."""
        for s in self.cfg.strategies:
            code = s.backbone.code
            if code not in self.checkpoints:
                path = resolve_checkpoint(s.backbone, self.cfg.weights.get(code), progress=self.cfg.progress)
                self.checkpoints[code], self.ckpt_sha[code] = path, sha256_file(path, cache=True)
            self.keys[s.name] = strategy_key(s.to_manifest(), self.ckpt_sha[code], self.precision)
            self.keys[s.attention_name] = f"{self.keys[s.name]}-attention"
        preload = self.device.startswith("cuda") and self.cfg.ray is None
        with ThreadPoolExecutor(1, thread_name_prefix="models") as loader:
            if preload:
                loading = loader.submit(self._load_models)
            t0 = time.perf_counter()
            self.shas = sha256_files([src.path for src in self.plan.sources], workers=max(4, cpu_cores()))
            self.timer.add("hashing", time.perf_counter() - t0)
            if preload:
                loading.result()

    def _load_models(self) -> None:
        """Put every backbone's model in the process-wide cache, where the Extractor finds it."""
        t0 = time.perf_counter()
        for code, s in {s.backbone.code: s for s in self.cfg.strategies}.items():
            path, sha = self.checkpoints[code], self.ckpt_sha[code]
            MODELS.get(s.backbone, path, device=self.device, expected_sha256=sha, download=False)
        self.timer.add("models", time.perf_counter() - t0)

    def _embed_missing(self, variant: str = "") -> int:
        """Embed (as ``variant`` shows them) the banners the cache lacks for some strategy; banners that failed
        before are not tried again. Returns how many were embedded. Attention maps: of the plain banners only."""
        keys = {s.name: variant_key(self.keys[s.name], variant) for s in self.cfg.strategies} if variant else self.keys
        cache, shas = self.cache, self.shas
        lacking, todo = missing(self.cfg.strategies, shas, keys, cache)
        if not todo:
            return 0
        if self.cfg.ray is not None:
            return _ray_embed().embed(self, lacking, keys)
        t0 = time.perf_counter()
        extractor = Extractor(
            lacking,
            device=self.device,
            precision=self.precision,
            checkpoints=self.checkpoints,
            expected_sha256=self.ckpt_sha,
            download=False,
            attention=not variant,
        )
        self.timer.add("models", time.perf_counter() - t0)
        done, t0 = 0, time.perf_counter()
        batches = extractor.iter_files(
            [self.plan.sources[i].path for i in todo],
            batch_size=self.cfg.batch_size or default_batch_size(self.device),
            num_workers=self.cfg.num_workers,
            decode=self.cfg.decode,
            timer=self.timer,
            image_op=partial(apply_variant, variant=variant) if variant else None,
        )
        desc = f"embedding {variant}".strip()
        # One writer thread persists each batch while the next one runs; at most two wait to be written.
        with (
            tqdm(total=len(todo), unit="img", desc=desc, disable=not self.cfg.progress, smoothing=0.1) as bar,
            ThreadPoolExecutor(1, thread_name_prefix="cache-writer") as writer,
        ):
            writes: deque = deque()
            for batch in batches:
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
        self.timer.add("embedding", time.perf_counter() - t0)
        return done

    def _write_index(self) -> None:
        """The tables strategy by strategy, files written and hashed in threads meanwhile; the manifest; the swap."""
        cfg, n = self.cfg, len(self.rows)
        t_start, t_tables = time.perf_counter(), 0.0
        row_shas = [self.shas[i] for i in self.rows]
        apps = [self.plan.sources[i].entry() for i in self.rows]
        with IndexWriter(cfg.out) as writer, ThreadPoolExecutor(4, thread_name_prefix="index-writer") as pool:
            apps_sha = writer.write_json(APPS, apps)
            writes = {}
            for s in cfg.strategies:
                key, code = self.keys[s.name], s.backbone.code
                emb = np.stack([self.cache.get(key, h) for h in row_shas]).astype(cfg.dtype)
                attention = np.stack([self.cache.get(self.keys[s.attention_name], h) for h in row_shas])
                t0 = time.perf_counter()
                with tqdm(total=n, unit="row", desc=f"neighbours {s.name}", disable=not cfg.progress) as bar:
                    if self.device.startswith("cuda"):
                        neighbours, scores = topk_table_device(emb, min(cfg.k, n - 1), self.device, progress=bar.update)
                    else:
                        neighbours, scores = topk_table(emb, min(cfg.k, n - 1), progress=bar.update)
                t_tables += time.perf_counter() - t0
                ckpt = {
                    "file": self.checkpoints[code].name,
                    "sha256": self.ckpt_sha[code],
                    "url": checkpoint_url(s.backbone),
                }
                extra = {"precision": self.precision, "cache_key": key}
                if cfg.variants:
                    extra["variants"] = self._write_variants(writer, s, emb, row_shas)
                args = (writer, s, emb, neighbours, scores, ckpt, attention)
                writes[s.name] = pool.submit(write_strategy, *args, **extra)
            entries = {name: future.result() for name, future in writes.items()}
            build = {"device": self.device, "torch": torch.__version__, "python": platform.python_version()}
            writer.commit(
                make_manifest(
                    n,
                    apps_sha,
                    cfg.dtype,
                    entries,
                    skipped_images=self.skipped,
                    missing_images=self.plan.missing_images,
                    variants=cfg.variants,
                    build=build,
                )
            )
        self.timer.add("tables", t_tables)
        self.timer.add("writing", time.perf_counter() - t_start - t_tables)

    def _write_variants(self, writer: IndexWriter, s: Strategy, emb: np.ndarray, row_shas: list[str]) -> dict:
        """Each variant's exact top-k among the plain embeddings (a float64 brute force, on the GPU on CUDA); the
        manifest's entry."""
        entries = {}
        for variant in self.cfg.variants:
            vkey = variant_key(self.keys[s.name], variant)
            queries = np.stack([self.cache.get(vkey, h) for h in row_shas]).astype(self.cfg.dtype)
            device = self.device if self.device.startswith("cuda") else "cpu"
            nbr, sco = topk_table_device(emb, self.cfg.k, device, queries=queries, chunk_rows=256)
            entries[variant] = write_variant(writer, s.name, variant, queries, nbr, sco)
        return entries
