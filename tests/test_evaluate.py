"""The label-free evaluation: alterations, copy detection, agreement of the tables, reports and the CLI.

Embedding runs only ViT-S/16 strategies (SimpleS16 and ComplexS16 share one forward pass), on a few
banners, so that the whole file stays well under a minute on two cores; the overlap tests read every
strategy's tables, which costs nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import random
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from core.dino.weights import ModelCache
from core.images import open_image
from core.index import load_index
from indexer.evaluation import alterations, report
from indexer.evaluation import metrics as ev

S16 = ["SimpleS16", "ComplexS16"]
MILD = ("jpeg", "resize", "flip")  # alterations that must leave a banner its own nearest neighbour


@pytest.fixture(scope="module")
def index(built_index):
    return load_index(built_index.index)


@pytest.fixture(scope="module")
def models():
    """One model cache for the module: ViT-S/16 is loaded once."""
    return ModelCache()


@pytest.fixture
def extractors(built_index, index, models, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))
    return ev.make_extractors(index, S16, models=models)


@pytest.fixture(scope="module")
def cli():
    """The steam-dino-evaluate command as a module, for in-process calls of its main()."""
    return importlib.import_module("indexer.cli.evaluate")


def test_one_extractor_per_checkpoint_of_a_backbone(index, monkeypatch):
    """Backbones with one checkpoint each share an extractor, so each image is preprocessed once for all."""
    monkeypatch.setattr(ev, "Extractor", lambda ms, expected_sha256, **_: ([s.name for s in ms], expected_sha256))
    names = ["SimpleS16", "ComplexB16", "ComplexS16"]
    shas = {name: index.strategies[name].entry["checkpoint"]["sha256"] for name in names}
    assert ev.make_extractors(index, names) == [(names, {"S16": shas["SimpleS16"], "B16": shas["ComplexB16"]})]
    other = types.SimpleNamespace(entry=copy.deepcopy(index.strategies["ComplexS16"].entry))
    other.entry["checkpoint"]["sha256"] = "0" * 64  # ComplexS16 embedded with another ViT-S/16 checkpoint
    rebuilt = types.SimpleNamespace(strategies={**index.strategies, "ComplexS16": other})
    assert ev.make_extractors(rebuilt, names) == [
        (["SimpleS16", "ComplexB16"], {"S16": shas["SimpleS16"], "B16": shas["ComplexB16"]}),
        (["ComplexS16"], {"S16": "0" * 64}),
    ]


def banner(built_index, index, row: int) -> Image.Image:
    return open_image(built_index.banners / f"{int(index.appids[row])}.jpg")


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "indexer.cli.evaluate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


# ---------------------------------------------------------------------------------------------
# Alterations
# ---------------------------------------------------------------------------------------------


def test_alterations_are_deterministic_and_really_altered(built_index, index):
    img = banner(built_index, index, 0)
    a = alterations.alterations(img, random.Random(1))
    b = alterations.alterations(img, random.Random(1))
    c = alterations.alterations(img, random.Random(2))
    assert list(a) == list(alterations.ALTERATIONS)
    original = np.asarray(img)
    for name in alterations.ALTERATIONS:
        assert a[name].mode == "RGB"
        assert a[name].size == b[name].size and np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name
        same_size = a[name].size == img.size
        assert not same_size or not np.array_equal(np.asarray(a[name]), original), f"{name} left the image as is"
    for name in ("jpeg", "resize", "flip", "jitter"):
        assert a[name].size == img.size, name
    for name in ("crop", "strong"):
        assert a[name].size != img.size, name
    # Another seed draws other parameters (flip and resize have none).
    for name in ("crop", "jpeg", "jitter", "strong"):
        assert a[name].size != c[name].size or not np.array_equal(np.asarray(a[name]), np.asarray(c[name])), name
    assert np.array_equal(np.asarray(a["flip"]), original[:, ::-1])
    # The per-banner source of randomness depends on the seed and the appid only.
    assert (
        alterations.query_rng(0, 10).random()
        == alterations.query_rng(0, 10).random()
        != alterations.query_rng(1, 10).random()
    )


def test_crop_keeps_half_to_nine_tenths_of_the_area():
    img = Image.new("RGB", (300, 450))
    for seed in range(200):
        w, h = alterations.random_crop(img, random.Random(seed)).size
        assert 0.5 - 0.01 <= w * h / (300 * 450) <= 0.9 + 0.01
        assert w <= 300 and h <= 450


def test_sample_rows_is_seeded_and_capped():
    assert ev.sample_rows(24, 5, 0) == ev.sample_rows(24, 5, 0)
    assert ev.sample_rows(24, 5, 0) != ev.sample_rows(24, 5, 1)
    assert len(set(ev.sample_rows(24, 5, 0))) == 5
    assert ev.sample_rows(24, 100, 3) == list(range(24))
    with pytest.raises(ev.EvaluationError):
        ev.sample_rows(24, 0, 0)


def test_metrics_one_relevant_item():
    m = ev.metrics(np.array([1, 2, 0, 4]), k=10)
    assert m == ev.Metrics(recall_1=0.25, recall_k=0.75, map_k=pytest.approx((1 + 1 / 2 + 0 + 1 / 4) / 4), n=4)
    assert ev.metrics(np.array([5]), k=3).recall_k == 0.0  # a rank beyond k is not found


# ---------------------------------------------------------------------------------------------
# Embedding and copy detection
# ---------------------------------------------------------------------------------------------


def test_originals_embed_as_the_index_did(built_index, index, extractors):
    rows = [0, 7, 23]
    feats = ev.embed(extractors, [banner(built_index, index, r) for r in rows])
    for name in S16:
        stored = np.asarray(index.strategies[name].embeddings[rows], dtype=np.float32)
        np.testing.assert_allclose(feats[name], stored, atol=2e-3)  # float16 storage


@pytest.mark.slow
def test_mild_alterations_stay_nearest_to_their_original(built_index, index, extractors):
    """cos(altered i, banner i) > cos(altered i, banner j) for every other j, for JPEG, resize and flip.

    Random weights are no DINO, but their features still follow colours and layout: measured on these
    banners, the margin is about 0.025 for these three. Crops and colour jitter can lose against a
    similar-looking banner (crops do for 1-2 of the 24), so only the mild ones are required here.
    """
    rows = [0, 3, 5, 11, 16, 23]
    pairs = [
        (row, name, img)
        for row in rows
        for name, img in alterations.alterations(
            banner(built_index, index, row), alterations.query_rng(0, int(index.appids[row]))
        ).items()
        if name in MILD
    ]
    feats = ev.embed(extractors, [img for _, _, img in pairs])
    for name in S16:
        table = np.asarray(index.strategies[name].embeddings, dtype=np.float64)
        sims = feats[name].astype(np.float64) @ table.T
        for (row, alt, _), s in zip(pairs, sims, strict=True):
            others = np.delete(s, row)
            assert s[row] > others.max(), f"{name} {alt} of row {row}: {s[row]:.4f} <= {others.max():.4f}"
            assert s[row] > 0.98, (name, alt, row)


@pytest.mark.slow
def test_copy_detection_recall_is_high_for_mild_alterations(built_index, index, extractors):
    det = ev.copy_detection(
        index, built_index.banners, S16, queries=3, k=5, seed=0, extractors=extractors, progress=False
    )
    assert det.strategies == S16 and det.k == 5 and det.num_items == 24
    assert det.rows == ev.sample_rows(24, 3, 0) and not det.skipped
    for name in S16:
        for alt in alterations.ALTERATIONS:
            ranks = det.ranks[name][alt]
            assert ranks.shape == (3,) and ((ranks >= 0) & (ranks <= 5)).all()
        for alt in MILD:
            m = det.metrics(name, alt)
            assert (m.recall_1, m.recall_k, m.map_k, m.n) == (1.0, 1.0, 1.0, 3), (name, alt)
        overall = det.metrics(name)
        assert overall.n == 3 * len(alterations.ALTERATIONS)
        assert 0.5 <= overall.recall_1 <= overall.map_k <= overall.recall_k <= 1.0
        # The strong combination moves the features further than a JPEG does.
        assert det.similarity[name]["strong"].mean() < det.similarity[name]["jpeg"].mean()
    table = report.format_table(det, None)
    assert "AP = 1/rank of the original if it is in the top 5, else 0" in table
    assert report.to_markdown(det, None).count("| SimpleS16 |") == 1


def test_copy_detection_skips_missing_banners(built_index, index, extractors, tmp_path):
    folder = tmp_path / "banners"
    folder.mkdir()
    rows = ev.sample_rows(24, 2, 0)
    keep = int(index.appids[rows[0]])
    (folder / f"{keep}.jpg").write_bytes((built_index.banners / f"{keep}.jpg").read_bytes())
    (folder / f"{int(index.appids[rows[1]])}.png").write_bytes(b"not an image")
    det = ev.copy_detection(index, folder, ["SimpleS16"], queries=2, k=3, seed=0, extractors=extractors, progress=False)
    assert det.rows == [rows[0]] and [a for a, _ in det.skipped] == [int(index.appids[rows[1]])]
    assert "skipped appid" in report.format_table(det, None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ev.EvaluationError, match="none of the 2 sampled banners could be read"):
        ev.copy_detection(index, tmp_path / "empty", ["SimpleS16"], queries=2, k=3, extractors=extractors)


def test_unknown_strategy_and_bad_k(index):
    with pytest.raises(ev.EvaluationError, match=r"SimpleB8.*it has SimpleS16"):
        ev.check_strategies(index, ["SimpleB8"])
    with pytest.raises(ev.EvaluationError):
        ev.overlap_matrix(index, None, 0)


# ---------------------------------------------------------------------------------------------
# Agreement
# ---------------------------------------------------------------------------------------------


def test_overlap_matrix(index, built_index):
    ov = ev.overlap_matrix(index, None, 10)
    assert ov.strategies == built_index.strategies and ov.k == 10
    m = ov.matrix
    assert m.shape == (3, 3)
    np.testing.assert_array_equal(np.diag(m), 1.0)
    np.testing.assert_array_equal(m, m.T)
    assert ((m >= 0) & (m <= 1)).all()
    # Against a direct set computation, at a smaller k.
    a, b = (np.asarray(index.strategies[n].neighbours) for n in ("SimpleS16", "ComplexB16"))
    expected = np.mean([len(set(x[:4]) & set(y[:4])) / 4 for x, y in zip(a, b, strict=True)])
    assert ev.overlap_matrix(index, ["SimpleS16", "ComplexB16"], 4).matrix[0, 1] == pytest.approx(expected)
    # Wider than the tables: capped, and the report says so.
    wide = ev.overlap_matrix(index, ["SimpleS16"], 50)
    assert wide.k == 10 and wide.matrix.tolist() == [[1.0]]
    assert "capped" in report.format_table(None, wide)


def test_overlap_at_k_disjoint_and_identical():
    a = np.array([[1, 2, 3], [4, 5, 6]])
    assert ev.overlap_at_k(a, a, 3) == 1.0
    assert ev.overlap_at_k(a, a + 10, 3) == 0.0
    assert ev.overlap_at_k(a, np.array([[3, 9, 1], [7, 8, 9]]), 3) == pytest.approx((2 / 3 + 0) / 2)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_end_to_end(built_index, tmp_path, cli, run_main, monkeypatch):
    md = tmp_path / "results.md"
    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))
    r = run_main(
        cli.main,
        *("--index", str(built_index.index), "--images", str(built_index.banners)),
        *("--strategies", "SimpleS16,ComplexS16", "--queries", "1", "--k", "5", "--markdown", str(md)),
    )
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "AP = 1/rank of the original" in out and "mAP@5 = MRR@5" in out
    header = next(line for line in out.splitlines() if line.startswith("strategy"))
    assert header.split() == ["strategy", "alteration", "R@1", "R@5", "mAP@5", "cos", "n"]
    for alt in (ev.ALL, *alterations.ALTERATIONS):
        assert any(line.split()[:1] == [alt] or line.split()[1:2] == [alt] for line in out.splitlines()), alt
    assert "overlap@5" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("evaluated 2 strategies") and "on 1 query x 6 alterations in" in last
    assert "copy detection" in r.stderr  # the progress bar goes to stderr
    text = md.read_text()
    assert text.startswith("# Retrieval evaluation")
    assert "| strategy | alteration | R@1 | R@5 | mAP@5 | cos | n |" in text
    assert "| SimpleS16 | all |" in text and "| ComplexS16 | 1.000 |" not in text
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategies", "SimpleB8"], "not in the index"),
        (["--queries", "0"], "--queries must be at least 1"),
        (["--k", "0"], "--k must be at least 1"),
        (["--images", "/nonexistent/banners"], "no such folder"),
        (["--index", "/nonexistent/index"], "no index folder"),
        (["--strategies", "SimpleS16,Nope"], "'Nope' is not in the index"),
        (["--device", "tpu"], "--device tpu: expected cpu or cuda"),
        (["--markdown", "/"], "is a folder"),  # refused before minutes of work
    ],
)
def test_cli_bad_input_exits_2(built_index, cli, args, message, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))
    base = {"--index": str(built_index.index), "--images": str(built_index.banners)}
    base.update(dict(zip(args[::2], args[1::2], strict=True)))
    argv = [x for kv in base.items() for x in kv] + ["--quiet"]
    assert cli.main(argv) == 2
    out = capsys.readouterr()
    assert message in out.err and not out.out


def test_cli_ctrl_c_is_a_short_message(built_index, cli, run_main, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))
    monkeypatch.setattr(ev, "copy_detection", interrupt)
    argv = ["--index", str(built_index.index), "--images", str(built_index.banners), "--strategies", "SimpleS16"]
    r = run_main(cli.main, *argv, "--queries", "1", "--quiet")
    assert r.returncode == 130 and r.stderr.startswith("interrupted:"), r.stderr


def test_cli_bad_input_in_a_subprocess(built_index):
    r = run_cli("--index", str(built_index.index), "--images", str(built_index.banners), "--queries", "-3")
    assert r.returncode == 2 and "error: --queries must be at least 1" in r.stderr and not r.stdout


def test_cli_missing_checkpoint_exits_1(built_index, cli, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "torch_home"
    (empty / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(empty))
    monkeypatch.setenv("DINO_BASE_URL", "http://127.0.0.1:9")  # nothing listens: the download fails at once
    argv = ["--index", str(built_index.index), "--images", str(built_index.banners), "--strategies", "SimpleS16"]
    assert cli.main([*argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "dino_deitsmall16_pretrain.pth" in err and str(empty / "hub" / "checkpoints") in err
