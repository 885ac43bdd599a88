"""Extraction speed of each DINO backbone, against the machine's matmul rate and a naive baseline.

    python -m bench.extract [--backbones S16,S8,B16,B8] [--batches 1,8,16,32] [--batches8 1,4,8]
                            [--seconds 1.5] [--threads N] [--quick] [--json PATH]
    python -m bench.extract --device cuda [--files 512] [--batch 128] [--workers 8]
    python -m bench.extract --end-to-end          # and then the --device cuda table, on the CPU (fp32 only)

CPU (default): random full-size weights, the real extraction path (``Extractor.embed_tensors`` for the
Simple and Complex strategies of the backbone, one forward serving both, under its inference mode) on
preprocessed 224x224 banners; images/s at batch 1 and at the best batch size (best of a few timed
iterations), the counted FLOPs (``count_flops``, [CLS]-only last block when the forward does that),
the fraction of this machine's fp32 matmul rate (best torch square sgemm at 1024/2048/3072) they
achieve, and the speed-up over a naive loop: one image at a time through the eager-attention
reference formulation (``bench/reference_vit.py``, the official DINO code's attention and
``get_intermediate_layers``), whose features must match ours.

``--device cuda`` (or, after the CPU table, ``--end-to-end``): images/s end to end from JPEG files
on disk (300x450 banners decoded in DataLoader workers by ``Extractor.iter_files``), on pre-decoded
tensors, and decoding alone, for fp32 and bf16/fp16, with the deviation of the bf16/fp16 features from fp32, and
what bounds the end-to-end rate.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import (
    Results,
    Workspace,
    base_parser,
    machine_line,
    make_banner,
    print_table,
    skip_exit_collection,
    write_banners,
)
from bench.reference_vit import reference_features, reference_model
from core.dino.backbones import BACKBONES
from core.dino.extract import Extractor, configure_threads
from core.dino.strategies import parse_strategies
from core.dino.weights import ModelCache
from devtools.flops import count_flops

S16_TARGET = 0.75  # ViT-S/16 at >= 75% of the measured matmul rate


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(sizes: list[int], device: torch.device, reps: int = 3) -> tuple[float, dict[int, float]]:
    """Best fp32 GFLOP/s of a square torch.mm at each size (TF32 off on CUDA), and the max over sizes."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    per = {}
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        torch.mm(a, b)
        sync(device)
        best = 0.0
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
        per[n] = best
        del a, b
    return max(per.values()), per


def best_rate(fn, images: int, min_iters: int, seconds: float, max_iters: int = 6) -> tuple[float, int]:
    """images/s of the fastest of several timed calls (at least min_iters, then until `seconds`)."""
    best, iters, spent = 0.0, 0, 0.0
    while iters < min_iters or (spent < seconds and iters < max_iters):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        spent += dt
        iters += 1
        best = max(best, images / dt)
    return best, iters


def strategies_of(code: str):
    return parse_strategies(f"Simple{code},Complex{code}")


def merged_needs(strategies):
    needs = strategies[0].needs
    for s in strategies[1:]:
        needs = needs.merge(s.needs)
    return needs


def preprocessed(ex: Extractor, n: int) -> torch.Tensor:
    """n generated banners through the strategies' preprocessing: a (n, 3, 224, 224) tensor."""
    return ex.preprocess([make_banner(1000 + i) for i in range(n)])[0]


def batch_of(base: torch.Tensor, b: int) -> torch.Tensor:
    reps = math.ceil(b / len(base))
    return base.repeat(reps, 1, 1, 1)[:b].contiguous()


# -- CPU: batch sizes, FLOPs, matmul rate, naive baseline ------------------------------------------
def bench_cpu_backbone(code: str, ckpt: Path, args) -> dict:
    backbone = BACKBONES[code]
    strategies = strategies_of(code)
    ex = Extractor(strategies, device="cpu", checkpoints={code: ckpt}, models=ModelCache())
    needs = merged_needs(strategies)
    flops = count_flops(backbone.config, 224, 224, cls_only_last_block=not needs.patch_tokens)
    slow = backbone.patch_size < 16
    batches = args.batches8 if slow else args.batches
    min_iters = 1 if slow or args.quick else 2
    base = preprocessed(ex, max(1, min(8, max(batches), args.naive_images)))
    ex.embed_tensors([batch_of(base, 1)])  # warm-up: threads, allocator, kernels
    rates = {}
    for b in batches:
        x = batch_of(base, b)
        rates[b], _ = best_rate(lambda x=x, ex=ex: ex.embed_tensors([x]), b, min_iters, args.seconds)
    best_b = max(rates, key=rates.get)

    # the naive loop: one image at a time through the official formulation
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    ref = reference_model(backbone.config, state)
    complex_params = next(s for s in strategies if s.style.name == "Complex").params
    n, avgpool = complex_params["n_last_blocks"], complex_params["avgpool_patchtokens"]
    imgs = base[: args.naive_images]
    if not (slow or args.quick):  # warm-up (skipped for /8 models, where one image costs seconds)
        reference_features(ref, imgs[:1], n, avgpool)
    done, t0, ref_out = 0, time.perf_counter(), []
    while done < len(imgs) and (done == 0 or time.perf_counter() - t0 < args.seconds):
        ref_out.append(reference_features(ref, imgs[done : done + 1], n, avgpool))
        done += 1
    naive = done / (time.perf_counter() - t0)
    ours = ex.embed_tensors([imgs[:done]])
    dev = 0.0
    for s in strategies:
        theirs = torch.cat([o[s.style.name] for o in ref_out]).numpy()
        dev = max(dev, float(np.abs(ours[s.name] - theirs).max()))
    del ex, ref, state
    achieved = flops * rates[best_b] / 1e9
    return {
        "code": code,
        "label": backbone.label,
        "b1": rates.get(1, float("nan")),
        "best_b": best_b,
        "best": rates[best_b],
        "gflop": flops / 1e9,
        "gflops": achieved,
        "naive": naive,
        "speedup": rates[best_b] / naive,
        "dev": dev,
        "rates": rates,
    }


def run_cpu(args, ws: Workspace, res: Results) -> None:
    threads = configure_threads(args.threads)
    print(f"{machine_line()}; torch {torch.__version__}, {threads} threads, fp32, device cpu", flush=True)
    rows, matmul = measure_cpu(args, ws)
    record_cpu(res, rows, matmul)
    print()
    print_cpu(rows, threads, matmul)


def measure_cpu(args, ws: Workspace) -> tuple[list[dict], float]:
    """Each backbone's figures (``bench_cpu_backbone``, with "frac" of the matmul rate) and that rate,
    measured before the models and again after them (the higher is kept, in case the load changed)."""
    matmul, per_size = matmul_rate(args.matmul_sizes, torch.device("cpu"))
    sizes = ", ".join(f"{n}: {g:.0f}" for n, g in per_size.items())
    print(f"fp32 matmul rate: {matmul:.1f} GFLOP/s (best of torch.mm at {sizes})", flush=True)
    rows = []
    for code in args.backbones:
        ckpt, _ = ws.checkpoint(code)
        r = bench_cpu_backbone(code, ckpt, args)
        tried = ", ".join(f"{b}: {v:.2f}" for b, v in r["rates"].items())
        print(f"  {code}: img/s by batch {{{tried}}}; naive {r['naive']:.2f} img/s", flush=True)
        rows.append(r)
    again, _ = matmul_rate(args.matmul_sizes, torch.device("cpu"))  # again, in case the load changed meanwhile
    if again > matmul:
        print(f"fp32 matmul rate measured again after the models: {again:.1f} GFLOP/s (used below)", flush=True)
        matmul = again
    for r in rows:
        r["frac"] = r["gflops"] / matmul
    return rows, matmul


def record_cpu(res: Results, rows: list[dict], matmul: float) -> None:
    res.add("fp32 matmul rate (torch.mm, best)", matmul, "GFLOP/s")
    for r in rows:
        label = r["label"]
        res.add(f"{label} img/s at batch 1", r["b1"], "img/s")
        res.add(f"{label} img/s at the best batch ({r['best_b']})", r["best"], "img/s")
        if r["code"] == "S16":
            res.add(f"{label} share of matmul rate", 100 * r["frac"], "%", ">= 75%", r["frac"] >= S16_TARGET)
        else:
            res.add(f"{label} share of matmul rate", 100 * r["frac"], "%")
        res.add(f"{label} speed-up over the naive loop", r["speedup"], "x", "> 1x", r["speedup"] > 1)


def print_cpu(rows: list[dict], threads: int, matmul: float) -> None:
    print_table(
        [
            "backbone",
            "b=1 img/s",
            "best b",
            "best img/s",
            "GFLOP/img",
            "GFLOP/s",
            "% matmul",
            "naive img/s",
            "speed-up",
            "max|Δ| ref",
        ],
        [
            [
                r["label"],
                r["b1"],
                r["best_b"],
                r["best"],
                r["gflop"],
                r["gflops"],
                f"{100 * r['frac']:.0f}%",
                r["naive"],
                f"{r['speedup']:.2f}x",
                r["dev"],
            ]
            for r in rows
        ],
        title=f"Extraction, Simple+Complex features in one forward, fp32 on {threads} CPU threads "
        f"(matmul rate {matmul:.0f} GFLOP/s; naive = batch 1, eager attention, full last block)",
    )
    verdicts = []
    s16 = next((r for r in rows if r["code"] == "S16"), None)
    if s16:
        ok = s16["frac"] >= S16_TARGET
        verdicts.append(
            f"ViT-S/16 at {100 * s16['frac']:.0f}% of the matmul rate (target >= 75%): {'PASS' if ok else 'MISS'}"
        )
    slower = [r["label"] for r in rows if r["speedup"] <= 1]
    verdicts.append(
        "every backbone faster than the naive loop: " + ("PASS" if not slower else f"MISS ({', '.join(slower)})")
    )
    print("verdict: " + "; ".join(verdicts))


# -- accelerator (or --end-to-end): files vs tensors, fp32 vs bf16/fp16 -----------------------------
def decode_rate(ex: Extractor, paths: list[Path], batch: int, workers: int) -> float:
    """images/s of decoding + preprocessing alone, in the same DataLoader workers as iter_files."""
    from torch.utils.data import DataLoader

    from core.dino.extract import _collate, _ImageFiles  # the dataset iter_files uses
    from core.images import DEFAULT_MAX_PIXELS

    loader = DataLoader(
        _ImageFiles(paths, ex.transforms, DEFAULT_MAX_PIXELS, ex.preprocessings),
        batch_size=batch,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
    )
    t0 = time.perf_counter()
    n = sum(len(indices) for indices, _, _ in loader)
    return n / (time.perf_counter() - t0)


def files_rate(ex: Extractor, paths: list[Path], batch: int, workers: int) -> float:
    t0 = time.perf_counter()
    n = sum(len(b.indices) for b in ex.iter_files(paths, batch_size=batch, num_workers=workers, decode="cpu"))
    return n / (time.perf_counter() - t0)


def run_device(args, ws: Workspace, res: Results) -> None:
    device = torch.device(args.device)
    if device.type == "cpu":
        configure_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"{machine_line()}; torch {torch.__version__}, device {name}", flush=True)
    matmul, _ = matmul_rate(args.matmul_sizes, device)
    print(f"fp32 matmul rate (no TF32): {matmul:.0f} GFLOP/s", flush=True)
    res.add(f"{device.type} fp32 matmul rate", matmul, "GFLOP/s")
    banners = write_banners(ws.root / "jpeg_banners", args.files)
    repeats = max(1, math.ceil(args.min_images / len(banners)))
    paths = banners * repeats
    rows = []
    for code in args.backbones:
        rows += bench_device_backbone(code, ws.checkpoint(code)[0], args, device, banners, paths, matmul, res)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print()
    print_table(
        [
            "backbone",
            "precision",
            "batch",
            "tensors img/s",
            "files img/s",
            "decode img/s",
            "bound by",
            "max|Δ| fp32",
            "min cos fp32",
            "% fp32 mm",
        ],
        rows,
        title=f"Extraction on {name}: {len(paths)} JPEG files ({len(banners)} distinct 300x450 banners), "
        f"{args.workers} DataLoader workers",
    )


def bench_device_backbone(
    code: str, ckpt: Path, args, device: torch.device, banners: list[Path], paths: list[Path], matmul: float, res
) -> list[list]:
    """One backbone's table rows, one per precision (fp32 first: the reference of the others)."""
    backbone = BACKBONES[code]
    precisions = ["fp32", "bf16", "fp16"] if device.type == "cuda" else ["fp32"]
    strategies = strategies_of(code)
    models = ModelCache()
    flops = count_flops(backbone.config, 224, 224, cls_only_last_block=not merged_needs(strategies).patch_tokens)
    ex32 = Extractor(strategies, device=str(device), checkpoints={code: ckpt}, models=models)
    x = batch_of(preprocessed(ex32, min(args.batch, 16)), args.batch).to(device)
    decode = decode_rate(ex32, paths, args.batch, args.workers)
    reference = None
    rows = []
    for precision in precisions:
        ex = Extractor(strategies, device=str(device), precision=precision, checkpoints={code: ckpt}, models=models)
        feats = ex.embed_tensors([x])  # warm-up (and the features compared across precisions)
        if reference is None:
            reference = feats
        tensor, _ = best_rate(
            lambda ex=ex, x=x: ex.embed_tensors([x]), args.batch, 1 if args.quick else 2, args.seconds
        )
        if not args.quick:
            files_rate(ex, banners[: args.batch * 2], args.batch, args.workers)  # warm-up: workers, caches
        e2e = files_rate(ex, paths, args.batch, args.workers)
        dev = max(float(np.abs(feats[s.name] - reference[s.name]).max()) for s in strategies)
        cos = min(float((feats[s.name] * reference[s.name]).sum(axis=1).min()) for s in strategies)
        if e2e >= 0.8 * tensor:
            bound = "compute"
        elif decode <= 1.25 * e2e:
            bound = "decoding"
        else:
            bound = "pipeline"  # neither alone: transfers, worker start-up, or both sharing the CPU
        mm_share = f"{100 * flops * tensor / 1e9 / matmul:.0f}%"
        rows.append([backbone.label, precision, args.batch, tensor, e2e, decode, bound, dev, cos, mm_share])
        res.add(f"{backbone.label} {precision} img/s from JPEG files", e2e, "img/s", note=f"bound by {bound}")
        res.add(f"{backbone.label} {precision} img/s on tensors", tensor, "img/s")
        if precision != "fp32":
            res.add(f"{backbone.label} {precision} min cosine vs fp32", cos)
    return rows


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--backbones", default=",".join(("S16", "S8", "B16", "B8")))
    p.add_argument("--batches", type=ints, default=[1, 8, 16, 32], help="batch sizes for /16 models")
    p.add_argument("--batches8", type=ints, default=[1, 4, 8], help="batch sizes for /8 models")
    p.add_argument("--seconds", type=float, default=1.5, help="timed seconds per measurement (at least 1 call)")
    p.add_argument("--naive-images", type=int, default=4, help="images through the naive loop (at most)")
    p.add_argument("--matmul-sizes", type=ints, default=None, help="default 1024,2048,3072 (CUDA: 2048,4096,8192)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda: the files/tensors/precision table")
    p.add_argument("--end-to-end", action="store_true", help="the --device table on this device (fp32 on CPU)")
    p.add_argument("--files", type=int, default=512, help="distinct JPEG banners for the end-to-end run")
    p.add_argument("--min-images", type=int, default=2048, help="end-to-end images (the files, repeated)")
    p.add_argument("--batch", type=int, default=None, help="end-to-end batch size (default 128 CUDA, 16 CPU)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the extractor's)")
    args = p.parse_args()
    args.backbones = [c.strip() for c in args.backbones.split(",") if c.strip()]
    unknown = [c for c in args.backbones if c not in BACKBONES]
    if unknown:
        p.error(f"unknown backbones {unknown}; known: {', '.join(BACKBONES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    device_mode = args.device != "cpu" or args.end_to_end
    if args.matmul_sizes is None:
        args.matmul_sizes = [2048, 4096, 8192] if args.device.startswith("cuda") else [1024, 2048, 3072]
    if args.quick:
        args.backbones = args.backbones if "--backbones" in sys.argv else ["S16"]
        args.batches, args.batches8, args.seconds, args.naive_images = [1, 2], [1, 2], 0.0, 1
        args.matmul_sizes = [256, 512]
        args.files, args.min_images = min(args.files, 2), 2
    if device_mode:
        from core.dino.extract import default_batch_size, default_num_workers

        args.batch = args.batch or (2 if args.quick else default_batch_size(args.device))
        args.workers = default_num_workers() if args.workers is None else args.workers
        if args.quick:
            args.workers = min(args.workers, 1)
    res = Results("extract")
    with Workspace(args.workdir) as ws:
        if args.device == "cpu":
            run_cpu(args, ws, res)
        if device_mode:
            print(flush=True)
            run_device(args, ws, res)
    res.write(args.json)
    skip_exit_collection()


if __name__ == "__main__":
    main()
