"""The builder's embedding pass on a Ray cluster (``build_index.py --ray [ADDRESS]``), with Ray Data.

One pipeline per backbone: a row is one forward batch of the local build, decoded by the local CPU path's
``decode_files``, then embedded by a pool of model actors (one per GPU, or per ``--threads`` cores), so that the
features are bit-identical to a local build's with the same ``--batch-size`` and ``--threads``. Each actor checks
its node's checkpoint against the driver's sha256; the driver writes every finished batch into the build's cache,
so a killed driver resumes. Ray is optional: imported for --ray only.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch
from tqdm import tqdm

from core.dino.extract import Extractor, decode_files, default_batch_size
from core.dino.preprocess import Preprocessing
from core.dino.strategies import Strategy, parse_strategies
from core.dino.weights import WeightsUnavailable

from .build import _Build, missing
from .sources import SourceError


def start(address: str, device: str | None, workers: int | None, threads: int) -> tuple[str, int]:
    """Join the cluster at ``address`` ("auto", "ray://host:10001"; "" starts a local instance), or this
    process's Ray session if it has one. Returns the model actors' device (cuda when the cluster has GPUs) and
    how many actors to start (``workers``, else as many as the cluster has room for), checked before the build
    writes anything."""
    if not ray.is_initialized():
        try:
            local = {} if address else {"include_dashboard": False}  # a client accepts no such arguments
            ray.init(address=address or "local", logging_level=logging.WARNING, **local)
        except (ConnectionError, ValueError) as e:  # nothing listening; a malformed address
            raise SourceError(f"--ray {address}: {e}") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the build shows its own, per backbone
    context.print_on_execution_start = False
    context.raise_original_map_exception = True
    gpus = ray.cluster_resources().get("GPU", 0)
    device = device or ("cuda" if gpus else "cpu")
    if device.startswith("cuda") and not gpus:
        raise SourceError("--device cuda: the Ray cluster has no GPU")
    return device, _actors(device, workers, threads)


class _Embedder:
    """A model actor: one backbone's strategies, the checkpoint checked against the driver's sha256."""

    def __init__(self, names: str, weights: Path | None, sha256: str, device: str, precision: str, threads: int):
        if device == "cpu":
            torch.set_num_threads(threads)
        self.strategies = parse_strategies(names)
        code = self.strategies[0].backbone.code
        try:
            self.extractor = Extractor(
                self.strategies,
                device=device,
                precision=precision,
                checkpoints={code: weights} if weights else None,
                expected_sha256={code: sha256},
                download=False,
                attention=True,
            )
        except WeightsUnavailable as e:  # raised by the first batch: Ray hands a task's exception to the driver
            self.extractor = e

    def __call__(self, batch: dict) -> dict:  # one row: one forward batch
        if isinstance(self.extractor, WeightsUnavailable):
            raise self.extractor
        row = {name: values[0] for name, values in batch.items()}
        t0 = time.perf_counter()
        if len(row["ok"]):
            preps = self.extractor.preprocessings
            features = self.extractor.embed_tensors([torch.from_numpy(np.array(row[f"x_{p.name}"])) for p in preps])
        else:
            features = self.extractor.no_features()
        out = {name: [row[name]] for name in ("first", "ok", "failures", "decoding")}
        return out | {f"f_{name}": [f] for name, f in features.items()} | {"forwards": [time.perf_counter() - t0]}


def _decode(row: dict, preps: list[Preprocessing]) -> dict:
    t0 = time.perf_counter()
    ok, tensors, failures = decode_files([Path(p) for p in row["paths"]], preps)
    out = {"first": row["first"], "ok": np.array(ok, np.int64), "failures": json.dumps(failures)}
    for i, p in enumerate(preps):
        out[f"x_{p.name}"] = tensors[i].numpy() if tensors else np.zeros((0, 3, *p.output_size), np.float32)
    return out | {"decoding": time.perf_counter() - t0}


def _actors(device: str, workers: int | None, threads: int) -> int:
    gpus, cpus = (int(ray.cluster_resources().get(r, 0)) for r in ("GPU", "CPU"))
    capacity = gpus if device.startswith("cuda") else cpus // threads
    actors = workers or capacity
    if not 1 <= actors <= capacity:
        asked = f"--workers {actors}" if workers else f"--device {device}, --threads {threads}"
        raise SourceError(f"{asked}: the Ray cluster has {gpus} GPUs and {cpus} CPUs")
    return actors


def embed(run: _Build, strategies: list[Strategy], keys: dict[str, str]) -> int:
    """Embed what the build's cache lacks, backbone by backbone, on ``cfg.num_workers`` actors (``start``'s count);
    returns how many banners were embedded (not failed)."""
    cfg, shas, cache, ckpt_sha, precision = run.cfg, run.shas, run.cache, run.ckpt_sha, run.precision
    device = cfg.device
    batch_size = cfg.batch_size or default_batch_size(device)
    threads = cfg.threads or 1
    on_gpu = device.startswith("cuda")
    actor_needs = {"num_gpus": 1, "num_cpus": 1} if on_gpu else {"num_cpus": threads}
    embedded: set[int] = set()
    for code in dict.fromkeys(s.backbone.code for s in strategies):
        group = [s for s in strategies if s.backbone.code == code]
        _, todo = missing(group, shas, keys, cache)
        rows = [
            {"first": j, "paths": [str(run.plan.sources[i].path) for i in todo[j : j + batch_size]]}
            for j in range(0, len(todo), batch_size)
        ]
        if not rows:
            continue
        preps = list(dict.fromkeys(s.preprocessing for s in group))
        args = (",".join(s.name for s in group), cfg.weights.get(code), ckpt_sha[code], device, precision, threads)
        ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(
            _decode, fn_kwargs={"preps": preps}, num_cpus=1 if on_gpu else threads
        )
        ds = ds.map_batches(
            _Embedder,
            fn_constructor_args=args,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_workers),
            **actor_needs,
        )
        names = [n for s in group for n in (s.name, s.attention_name)]
        t0 = time.perf_counter()
        with tqdm(total=len(todo), unit="img", desc=f"embedding {code}", disable=not cfg.progress) as bar:
            results = iter(ds.iter_rows())
            while row := _next(results):
                batch = todo[row["first"] : row["first"] + batch_size]
                ok = [batch[j] for j in row["ok"]]
                failed = {shas[batch[j]]: why for j, why in json.loads(row["failures"])}
                features = {keys[n]: np.asarray(row[f"f_{n}"]) for n in names}
                cache.add_batch([shas[i] for i in ok], features, failed)
                run.timer.add("decoding (all workers)", row["decoding"])
                run.timer.add(f"forwards {code} (all actors)", row["forwards"])
                embedded.update(ok)
                bar.update(len(batch))
        run.timer.add("embedding", time.perf_counter() - t0)
    return len(embedded)


def _next(results) -> dict | None:
    """The next finished batch; an actor's checkpoint problem is raised as itself, without Ray's traceback."""
    try:
        return next(results, None)
    except WeightsUnavailable as e:  # a RayTaskError(WeightsUnavailable): the actor's exception is its cause
        raise getattr(e, "cause", e) from None
