"""The benchmarks still run: ``bench/run_all.py --quick`` runs every one of them but ray_build (each as its own
command, at tiny sizes, two at a time, sharing one workspace) and prints their tables and the combined
one; ``bench/gpu_build.py --quick`` runs its whole pipeline on the CPU, meanwhile. Both start in the
background as soon as the tests are collected (tests/background.py), and these tests run last.

The figures at these sizes mean nothing; what is checked is that every benchmark runs to the end,
prints its table and verdict, and hands its figures to the combined table.
"""

from __future__ import annotations

import json

import background
import pytest


@pytest.fixture(scope="module")
def quick_run():
    """``bench.run_all --quick``'s output, combined table and workspace (tests/background.py started it)."""
    run = background.get("run_all")
    rc, out = run.wait(timeout=600)
    assert rc == 0, out[-8000:]
    return out, (run.work / "results.md").read_text(), run.work / "ws"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bench", "expected"),
    [
        ("extract", ["GFLOP/img", "% matmul", "naive img/s", "speed-up", "verdict: ViT-S/16 at"]),
        ("extract (files, --end-to-end)", ["tensors img/s", "files img/s", "decode img/s", "bound by"]),
        ("serve", ["alone", "beside slow clients", "beside uploaders", "new visitors answered", "python client"]),
        ("upload", ["ComplexS16", "forward ms", "search ms", "round trip ms", "search over"]),
        ("memory", ["tables PSS", "worker 2", "+ S16 upload", "verdict: launch to first /health"]),
        ("knn", ["topk_table, all rows (exact)", "ExactSearch.search"]),
        ("scale", ["strategy", "exact top-100 table", "upload round trip", "verdict: "]),
    ],
)
def test_each_benchmark_prints_its_table(quick_run, bench, expected):
    out, _, _ = quick_run
    sections = {part.split(":", 1)[0]: part for part in out.split("\n=== ")[1:]}  # "=== <name>: <command>"
    section = sections[bench.split()[0]]
    for text in expected:
        assert text in section, f"{bench}: {text!r} missing from its output"


@pytest.mark.slow
def test_combined_table(quick_run):
    out, md, ws = quick_run
    # each its own command, its output whole and in order even when two ran at once
    headers = [
        out.index(f"=== {bench}: -m bench.{bench} ")
        for bench in ("extract", "serve", "upload", "memory", "knn", "scale")
    ]
    assert headers == sorted(headers)
    combined = out.split("All benchmarks", 1)[1]
    for bench in ("extract", "serve", "upload", "memory", "knn"):
        assert f"\n{bench} " in combined, f"{bench} has no line in the combined table"
    assert "targets:" in combined and "FAILED" not in combined
    assert md.startswith("# Benchmarks\n") and "machine: " in md
    assert "\n| benchmark | figure | value | target | result |\n" in md
    assert "## GPU build" in md  # the recorded outputs of bench/recorded/ follow the table
    assert "GET /match answers equal the tables" in md
    # the workspace records what it built, so that the next benchmark reuses it
    assert json.loads((ws / "index-2000.params.json").read_text())["info"]["apps"] == 2000


@pytest.mark.slow
def test_gpu_build_background_on_the_cpu():
    """bench.gpu_build --quick: banners, checkpoint, the build as a command, the feature comparison."""
    rc, out = background.get("gpu_build").wait(timeout=600)
    assert rc == 0, out[-8000:]
    for expected in ("8 banners, 600x900 JPEG", "time: hashing", "from launch to exit", "min cos dev/CPU prep"):
        assert expected in out, expected
