"""The embedding pass of ViT-S/16 builds: the local build beside Ray (build_index.py --ray) with 1 and 2 CPU workers.

    python -m bench.ray_build [--n 160] [--workdir DIR]
    python -m bench.ray_build --quick      # 16 banners: checks that it runs

Writes ``--n`` synthetic 600x900 JPEG banners (the size of Steam's art) and a random ViT-S/16
checkpoint, then builds SimpleS16 three times from an empty work folder, in this process: locally
(``--threads`` = every core, one decoding worker), and on a local Ray instance of every core with
1 model actor of every core's threads, then 2 actors of 1 thread each. The rate is the builder's own
(embedded banners over the embedding pass's seconds, the actors' start and model loading included;
Ray's own start is not).
"""

from __future__ import annotations

import shutil

from bench.common import Results, Workspace, base_parser, machine_line, print_table, skip_exit_collection
from bench.gpu_build import write_catalog


def build(ws: Workspace, name: str, weights, **options):
    from core.dino.strategies import parse_strategies
    from indexer.build import BuildConfig, build_index

    out = ws.root / "ray_bench" / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{name}.work"), ignore_errors=True)
    cfg = BuildConfig(
        images=ws.root / "ray_banners",
        out=out,
        strategies=parse_strategies("SimpleS16"),
        k=10,
        device="cpu",
        weights={"S16": weights},
        progress=False,
        **options,
    )
    return build_index(cfg)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=160, help="banners (default 160)")
    args = p.parse_args()
    n = 16 if args.quick else args.n
    import ray

    from core.cpu import cpu_cores

    cores = cpu_cores()
    res = Results("ray_build")
    with Workspace(args.workdir) as ws:
        weights, _ = ws.checkpoint("S16")
        write_catalog(ws.root / "ray_banners", n, cores)
        print(machine_line(), flush=True)
        runs = [("local", 1, cores, {})]
        ray.init(num_cpus=cores, include_dashboard=False)
        runs += [(f"Ray, {w} CPU worker{'s' * (w > 1)}", w, cores // w, {"ray": "", "num_workers": w}) for w in (1, 2)]
        rows, local_rate = [], None
        for label, workers, threads, options in runs:
            summary = build(ws, label.split(",")[0].lower() + str(workers), weights, threads=threads, **options)
            rate = summary.embedded / summary.embed_seconds
            local_rate = local_rate or rate
            rows.append([label, workers, threads, summary.embedded, summary.embed_seconds, rate, rate / local_rate])
            res.add(f"ViT-S/16 img/s, {label}", rate, "img/s")
        ray.shutdown()
    print_table(
        ["build", "workers", "threads each", "banners", "embedding s", "img/s", "x local"],
        rows,
        title=f"SimpleS16 (ViT-S/16) embedding pass, {n} banners of 600x900, batch 16, {cores} cores",
    )
    res.write(args.json)
    skip_exit_collection()


if __name__ == "__main__":
    main()
