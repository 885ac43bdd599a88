"""The whole-catalog build on a GPU, end to end, on a bare machine with only this repository.

    python -m bench.gpu_build [--n 29982] [--device cuda] [--precision bf16] [--subset 2048] [--workdir DIR]
    python -m bench.gpu_build --quick          # 8 banners, CPU, two strategies: checks that it runs
                                               # (without timing Python's start and imports apart)

1. writes ``--n`` synthetic 600x900 JPEG banners with film grain (about 230 KB each, like Steam's
   ``library_600x900.jpg``), in processes, and random checkpoints of the four real DINO shapes;
2. runs ``build_index`` as a command (``--strategies all --device cuda``), timed from launch to exit,
   and prints its closing summary (hashing, decoding, forwards per backbone, tables, writing);
3. on the first ``--subset`` banners, compares features: the device input path (nvJPEG + tensor
   preprocessing) against the CPU path that uploads use (Pillow), both fp32, and bf16 autocast
   against fp32: the minimum cosine per strategy and the overlap of their top-10 neighbour lists
   (tables over the subset), plus the pixel differences of decoding and of resizing alone.

The weights are random (the real checkpoints cannot be fetched there), so the figures of step 3
bound what changes in the inputs of the models, not how real DINO features rank real banners.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from bench.common import Results, Workspace, base_parser, print_table, skip_exit_collection

CATALOG = 29_982
TARGET_S, STRETCH_S = 30, 20  # the whole build, launch to exit


def _write_one(job: tuple[int, str]) -> int:
    from devtools.synthetic import textured_banner_jpeg  # imported by write_catalog before the fork

    seed, path = job
    p = Path(path)
    if not p.is_file():
        data = textured_banner_jpeg(seed)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, p)
    return p.stat().st_size


def write_catalog(folder: Path, n: int, processes: int) -> tuple[list[Path], float, float]:
    """n banners named <appid>.jpg (reused when there); returns the paths, seconds and mean size (KB)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{10 * (i + 1)}.jpg" for i in range(n)]
    t0 = time.perf_counter()
    import devtools.synthetic  # noqa: F401 - once, here: it imports torch (seconds), then each fork has it

    with get_context("fork").Pool(processes) as pool:
        sizes = pool.map(_write_one, [(i, str(p)) for i, p in enumerate(paths)], chunksize=64)
    return paths, time.perf_counter() - t0, sum(sizes) / len(sizes) / 1000


def import_seconds() -> float:
    """What launching the command costs before it starts: Python and the build's imports (torch...)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import indexer.cli.build_index, indexer.build"], check=True)
    return time.perf_counter() - t0


def run_build(args, ws: Workspace, images: Path, weights: dict[str, Path], batch: int | None) -> tuple[float, str, int]:
    out = ws.root / "index_gpu"
    subprocess.run(["rm", "-rf", str(out), str(ws.root / ".index_gpu.work")], check=True)
    cmd = [sys.executable, "-m", "indexer.cli.build_index", "--images", str(images), "--out", str(out)]
    cmd += ["--strategies", args.strategies, "--device", args.device, "--quiet"]
    cmd += [f"--weights={code}={path}" for code, path in weights.items()]
    if args.precision:
        cmd += ["--precision", args.precision]
    if batch:
        cmd += ["--batch-size", str(batch)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return seconds, (proc.stdout + proc.stderr).strip(), proc.returncode


def embed(ex, paths: list[Path], decode: str, workers: int) -> dict[str, np.ndarray]:
    rows: dict[str, list] = {}
    for batch in ex.iter_files(paths, decode=decode, num_workers=workers):
        assert not batch.failures, batch.failures
        for name, feats in batch.features.items():
            rows.setdefault(name, []).append(feats)
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def compare(a: dict[str, np.ndarray], b: dict[str, np.ndarray], device: str) -> dict[str, tuple[float, float]]:
    """Per strategy: min cosine of matching rows, and mean overlap of the two top-10 tables over the subset."""
    from core.knn_device import topk_table_device

    out = {}
    for name in a:
        cos = float((a[name].astype(np.float64) * b[name]).sum(axis=1).min())
        na, _ = topk_table_device(a[name], 10, device)
        nb, _ = topk_table_device(b[name], 10, device)
        overlap = float(np.mean([len(set(x) & set(y)) / na.shape[1] for x, y in zip(na, nb, strict=True)]))
        out[name] = (cos, overlap)
    return out


def pixel_checks(paths: list[Path], device: str) -> tuple[float, float, float]:
    """Decoding alone (device decoder vs Pillow): max and mean |diff| in levels; resizing alone: max |diff|."""
    import torch

    from core.dino.device_input import nvjpeg_decoder
    from core.dino.preprocess import PREPROCESSINGS
    from core.images import open_image

    decode = nvjpeg_decoder(device)
    prep = PREPROCESSINGS["dino"]
    dmax, dmean, rmax = 0.0, [], 0.0
    for p in paths:
        pil = torch.from_numpy(np.array(open_image(p))).permute(2, 0, 1)
        dev = decode([torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)])[0].cpu()
        diff = (dev.int() - pil.int()).abs().float()
        dmax, dmean = max(dmax, float(diff.max())), [*dmean, float(diff.mean())]
        ours = prep.tensor_transform(pil[None].to(device))[0].cpu()
        ref = prep.transform()(open_image(p))
        rmax = max(rmax, float(((ours - ref).abs() * torch.tensor(prep.std)[:, None, None] * 255).max()))
    return dmax, float(np.mean(dmean)), rmax


def fidelity(args, paths: list[Path], weights: dict[str, Path], res: Results) -> None:
    import torch

    from core.cpu import cpu_cores
    from core.dino.extract import Extractor
    from core.dino.strategies import parse_strategies

    strategies = parse_strategies(args.strategies)
    workers = max(1, cpu_cores() - 1)
    t0 = time.perf_counter()
    ex32 = Extractor(strategies, device=args.device, precision="fp32", checkpoints=weights)
    dev32 = embed(ex32, paths, "device", workers)
    cpu32 = embed(ex32, paths, "cpu", workers)
    prep = compare(dev32, cpu32, args.device)
    rows = []
    low = None
    if args.device.startswith("cuda"):
        ex16 = Extractor(strategies, device=args.device, precision="bf16", checkpoints=weights)
        low = compare(embed(ex16, paths, "device", workers), dev32, args.device)
    for name in dev32:
        cells = [prep[name][0], prep[name][1], *(low[name] if low else ())]
        rows.append([name, *(f"{v:.6f}" for v in cells), *(() if low else ("-", "-"))])
        res.add(
            f"{name} min cosine, device vs CPU preprocessing", prep[name][0], "", ">= 0.999", prep[name][0] >= 0.999
        )
        res.add(
            f"{name} top-10 overlap, device vs CPU preprocessing", prep[name][1], "", ">= 0.98", prep[name][1] >= 0.98
        )
        if low:
            res.add(f"{name} top-10 overlap, bf16 vs fp32", low[name][1], "", ">= 0.99", low[name][1] >= 0.99)
    print_table(
        ["strategy", "min cos dev/CPU prep", "top-10 overlap dev/CPU", "min cos bf16/fp32", "top-10 overlap bf16/fp32"],
        rows,
        title=f"Features on {len(paths)} banners (tables over them), random weights, {time.perf_counter() - t0:.0f} s",
    )
    dmax, dmean, rmax = pixel_checks(paths[:32], args.device)
    print(
        f"decoding, device decoder vs Pillow: max |diff| {dmax:.0f} levels, mean {dmean:.3f}; "
        f"resizing alone (same decoded pixels), tensors vs Pillow: max |diff| {rmax:.2f} levels"
    )
    res.add("decode max |diff| vs Pillow", dmax, "levels")
    res.add("decode mean |diff| vs Pillow", dmean, "levels")
    res.add("resize max |diff| vs Pillow", rmax, "levels")
    del ex32
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def breakdown(output: str, build_s: float) -> str:
    """The build's own time split, plus what lies outside ``build_index`` (Python, imports, exit)."""
    inner = re.search(r" in ([0-9.]+) s, embedding at", output)
    split = next((line for line in output.splitlines() if line.startswith("time: ")), "time: -")
    if inner is None:
        return split
    return f"{split}; outside build_index (Python, imports, exit) {build_s - float(inner.group(1)):.2f} s"


def _verdict(rc: int, seconds: float) -> str:
    if rc != 0:
        return f"FAILED (rc {rc})"
    return "met, stretch met" if seconds < STRETCH_S else "met" if seconds < TARGET_S else "missed"


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=CATALOG, help="banners (default: the catalog's 29,982)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16", help="the build's --precision (default bf16; '' for its default)")
    p.add_argument("--strategies", default="all")
    p.add_argument("--subset", type=int, default=2048, help="banners for the feature comparisons (0: none)")
    p.add_argument("--batch-sizes", default="", help="also build with these --batch-size values (e.g. 512)")
    args = p.parse_args()
    if args.quick:
        args.n, args.device, args.precision, args.subset = min(args.n, 8), "cpu", "", min(args.subset, 4)
        args.strategies = "SimpleS16,ComplexS16" if args.strategies == "all" else args.strategies
    from core.cpu import cpu_cores

    res = Results("gpu_build")
    with Workspace(args.workdir) as ws:
        t_all = time.perf_counter()
        images = ws.root / "catalog_600x900"
        paths, seconds, kb = write_catalog(images, args.n, cpu_cores())
        print(f"{len(paths)} banners, 600x900 JPEG, {kb:.0f} KB on average, written in {seconds:.1f} s", flush=True)
        from core.dino.strategies import parse_strategies

        codes = list(dict.fromkeys(s.backbone.code for s in parse_strategies(args.strategies)))
        t0 = time.perf_counter()
        weights = {code: ws.checkpoint(code)[0] for code in codes}
        print(f"random checkpoints {', '.join(codes)} ready in {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.quick:  # a figure only: seconds of importing torch again
            print(f"launching Python and importing the build: {import_seconds():.1f} s", flush=True)
        build_s, output, rc = run_build(args, ws, images, weights, None)
        print(output)
        print(f"build_index, {len(paths)} banners, {args.strategies}: {build_s:.1f} s from launch to exit (rc {rc})")
        target = f"< {TARGET_S} s (stretch {STRETCH_S} s)"
        res.add("whole build, launch to exit", build_s, "s", target, rc == 0 and build_s < TARGET_S)
        split = breakdown(output, build_s)
        for batch in [int(b) for b in args.batch_sizes.split(",") if b.strip()]:
            seconds, other, code = run_build(args, ws, images, weights, batch)
            print(other)
            print(f"the same with --batch-size {batch}: {seconds:.1f} s from launch to exit (rc {code})")
            res.add(f"whole build, --batch-size {batch}", seconds, "s")
        sys.stdout.flush()
        if args.subset:
            fidelity(args, paths[: args.subset], weights, res)
        print(f"bench.gpu_build in {time.perf_counter() - t_all:.0f} s in all")
        print(split)
        print(f"verdict: {build_s:.1f} s from launch to exit, target {target}: {_verdict(rc, build_s)}")
    res.write(args.json)
    skip_exit_collection()
    if rc != 0:
        sys.exit(rc)


if __name__ == "__main__":
    main()
