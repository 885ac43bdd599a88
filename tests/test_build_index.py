"""The offline index builder, end to end on generated banners with random checkpoints."""

from __future__ import annotations

import errno
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, arrays_of, kill_after_chunks, make_banner, make_catalog, sha256_of

from core.dino.extract import Extractor
from core.dino.strategies import parse_strategies
from core.dino.weights import ModelCache
from core.images import open_image
from core.index import FORMAT, FORMAT_VERSION, IndexWriter, load_index, recover
from core.sketch import Int8Sketch
from indexer.build import BuildConfig, BuildFailed, build_index
from indexer.cli import build_index as build_index_cli

SCRIPT = ROOT / "scripts" / "build_index.py"


@pytest.fixture
def run_cli(run_main):
    """scripts/build_index.py's main(), in this process, with --quiet."""
    return lambda *args: run_main(build_index_cli.main, *args, "--quiet")


def brute_force(emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores of the stored values; best first, ties by lower index, self excluded."""
    e = emb.astype(np.float64)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)
    idx = np.arange(len(e))
    order = np.array([np.lexsort((idx, -row))[:k] for row in s])
    return order, np.take_along_axis(s, order, 1)


def test_layout_manifest_and_tables(built_index):
    idx = built_index.index
    manifest = json.loads((idx / "manifest.json").read_text())
    assert manifest["format"] == FORMAT and manifest["format_version"] == FORMAT_VERSION
    assert manifest["num_apps"] == 24 and manifest["embeddings_dtype"] == "float16"
    apps = json.loads((idx / "apps.json").read_text())
    assert apps == sorted(built_index.apps, key=lambda a: a["appid"])
    assert set(manifest["strategies"]) == set(built_index.strategies)
    ckpt = built_index.torch_home / "hub" / "checkpoints"
    for name, entry in manifest["strategies"].items():
        assert sorted(p.name for p in (idx / name).iterdir()) == [
            "attention.npy",
            "embeddings.npy",
            "neighbours.npy",
            "scores.npy",
            "sketch",
        ]
        assert sorted(p.name for p in (idx / name / "sketch").iterdir()) == sorted(entry["sketch"]["files"])
        for fname, spec in entry["sketch"]["files"].items():
            assert spec["sha256"] == sha256_of(idx / name / "sketch" / fname)
        assert entry["k"] == 10
        assert entry["checkpoint"]["sha256"] == sha256_of(ckpt / entry["checkpoint"]["file"])
        assert entry["preprocessing"]["name"] == "dino" and entry["preprocessing"]["crop"] == [224, 224]
        for fname, spec in entry["files"].items():
            assert spec["sha256"] == sha256_of(idx / name / fname)
        emb = np.load(idx / name / "embeddings.npy")
        nbr = np.load(idx / name / "neighbours.npy")
        sco = np.load(idx / name / "scores.npy")
        assert emb.shape == (24, entry["dim"]) and emb.dtype == np.float16
        assert nbr.dtype == np.int32 and sco.dtype == np.float32 and nbr.shape == sco.shape == (24, 10)
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float64), axis=1), 1.0, atol=2e-3)
        want_nbr, want_sco = brute_force(emb, 10)
        assert np.array_equal(nbr, want_nbr), name
        np.testing.assert_allclose(sco, want_sco, rtol=0, atol=1e-7)
        assert not (nbr == np.arange(24)[:, None]).any()
        attention = np.load(idx / name / "attention.npy")  # [CLS] attention to each of the 14x14 patches
        assert entry["attention"] == {
            "shape": [24, 14, 14],
            "dtype": "float16",
            "sha256": sha256_of(idx / name / "attention.npy"),
        }
        assert attention.dtype == np.float16 and (attention >= 0).all()
        np.testing.assert_allclose(attention.astype(np.float64).sum(axis=(1, 2)), 1.0, atol=0.2)  # [CLS] takes the rest
    assert manifest["strategies"]["ComplexS16"]["params"] == {"n_last_blocks": 4, "avgpool_patchtokens": False}
    assert manifest["strategies"]["ComplexB16"]["dim"] == 1536
    loaded = load_index(idx)  # the service's own checks accept it
    for name, s in loaded.strategies.items():  # the stored sketch is the one the embeddings give
        made = Int8Sketch.of(np.asarray(s.embeddings)).arrays()
        for fname, array in s.sketch.arrays().items():
            np.testing.assert_array_equal(array, made[fname], err_msg=f"{name}/sketch/{fname}")


@pytest.mark.slow
def test_embeddings_equal_single_image_extraction(built_index, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))
    ex = Extractor(parse_strategies(",".join(built_index.strategies)), models=ModelCache(), attention=True)
    apps = json.loads((built_index.index / "apps.json").read_text())
    for row in (0, 7, 23):
        img = open_image(built_index.banners / f"{apps[row]['appid']}.jpg")
        single = ex.embed_images([img])
        for name in built_index.strategies:
            stored = np.load(built_index.index / name / "embeddings.npy")[row].astype(np.float32)
            np.testing.assert_allclose(stored, single[name][0], atol=1e-3, rtol=0)  # float16 storage
            stored = np.load(built_index.index / name / "attention.npy")[row].astype(np.float32)
            np.testing.assert_allclose(stored, single[f"{name}:attention"][0], atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_float32_storage_and_corrupt_images_skipped(tmp_path, install_checkpoints, run_cli):
    install_checkpoints("S16")
    apps = make_catalog(tmp_path / "banners", 6)
    (tmp_path / "banners" / "7.jpg").write_bytes(b"<html>not a banner</html>")
    good = (tmp_path / "banners" / "10.jpg").read_bytes()
    (tmp_path / "banners" / "8.jpg").write_bytes(good[: len(good) // 3])  # truncated
    (tmp_path / "banners" / "9.png").write_bytes(b"")  # empty
    (tmp_path / "banners" / "notes.txt").write_text("ignored")
    r = run_cli(
        "--images",
        str(tmp_path / "banners"),
        "--out",
        str(tmp_path / "index"),
        "--strategies",
        "SimpleS16,ComplexS16",
        "--k",
        "3",
        "--dtype",
        "float32",
    )
    assert r.returncode == 0, r.stderr
    assert "6 images" in r.stdout and "3 skipped" in r.stdout
    assert r.stderr.count("warning: skipped") == 3
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert sorted(s["appid"] for s in manifest["skipped_images"]) == [7, 8, 9]
    assert [a["appid"] for a in json.loads((tmp_path / "index" / "apps.json").read_text())] == [
        a["appid"] for a in apps
    ]
    emb = np.load(tmp_path / "index" / "SimpleS16" / "embeddings.npy")
    assert emb.dtype == np.float32
    ex = Extractor(parse_strategies("SimpleS16"), models=ModelCache())
    single = ex.embed_images([open_image(tmp_path / "banners" / "30.jpg")])["SimpleS16"][0]
    np.testing.assert_allclose(emb[2], single, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_apps_list_names_and_missing(tmp_path, install_checkpoints, run_cli):
    install_checkpoints("S16")
    apps = make_catalog(tmp_path / "banners", 4)
    make_banner(tmp_path / "banners" / "999.jpg", seed=1)  # not in the list: ignored
    listed = [*apps, {"appid": 12345, "name": "No banner"}]
    (tmp_path / "apps.json").write_text(json.dumps(listed))
    r = run_cli(
        "--images",
        str(tmp_path / "banners"),
        "--out",
        str(tmp_path / "index"),
        "--strategies",
        "SimpleS16",
        "--apps",
        str(tmp_path / "apps.json"),
    )
    assert r.returncode == 0, r.stderr
    assert "1 listed apps without a banner" in r.stdout
    index = load_index(tmp_path / "index")
    assert list(index.apps) == apps  # the store's banner paths kept
    assert index.strategies["SimpleS16"].k == 3  # k capped to N - 1
    assert index.manifest["missing_images"] == [12345]


def test_a_banner_named_0_is_no_game(tmp_path, install_checkpoints, run_cli):
    """Appid 0 is no game, and an index listing it would not load: a file 0.jpg is not taken for one."""
    install_checkpoints("S16")
    apps = make_catalog(tmp_path / "banners", 3)
    make_banner(tmp_path / "banners" / "0.jpg", seed=1)
    r = run_cli("--images", str(tmp_path / "banners"), "--out", str(tmp_path / "index"), "--strategies", "SimpleS16")
    assert r.returncode == 0, r.stderr
    assert [a["appid"] for a in load_index(tmp_path / "index").apps] == [a["appid"] for a in apps]


def test_out_never_replaces_the_banners_or_another_folder(tmp_path, install_checkpoints, run_cli, monkeypatch):
    """The build swaps its --out in whole: not the banners' folder, a folder holding it, or any other folder."""
    install_checkpoints("S16")
    monkeypatch.chdir(tmp_path)
    make_catalog(tmp_path / "data" / "banners", 3)
    (tmp_path / "data" / "notes.txt").write_text("mine")
    before = sorted(p.name for p in (tmp_path / "data" / "banners").iterdir())
    for out in (tmp_path / "data" / "banners", tmp_path / "data", "data/banners", "data", "."):
        r = run_cli("--images", str(tmp_path / "data" / "banners"), "--out", str(out), "--strategies", "SimpleS16")
        assert r.returncode == 2 and r.stderr.startswith("error: --out") and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in (tmp_path / "data" / "banners").iterdir()) == before
    assert (tmp_path / "data" / "notes.txt").read_text() == "mine"
    (tmp_path / "afile").write_text("x")  # bad input, not a failure to resume from
    r = run_cli("--images", "data/banners", "--out", "afile/index", "--strategies", "SimpleS16")
    assert r.returncode == 2 and "afile is not a folder" in r.stderr, r.stderr
    (tmp_path / "empty").mkdir()  # an empty folder, then the index built in it, are fine
    for _ in range(2):
        r = run_cli("--images", "data/banners", "--out", "empty", "--strategies", "SimpleS16")
        assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--strategies", "FancyB16"], "unknown strategy"),
        (["--k", "0"], "--k must be at least 1"),
        (["--apps", "nope.json"], "no such file"),
        (["--weights", "a.pth", "--strategies", "SimpleS16,SimpleB16"], "say which one"),
        (["--weights", "S8=a.pth", "--strategies", "SimpleS16"], "which no requested strategy uses"),
        (["--device", "tpu"], "--device tpu: expected cpu or cuda"),
        (["--workers", "-2"], "--workers must be at least 0"),
        (["--threads", "-1"], "--threads must be at least 1"),
    ],
)
def test_bad_input_changes_nothing(tmp_path, args, message, run_cli):
    make_catalog(tmp_path / "banners", 3)
    r = run_cli("--images", str(tmp_path / "banners"), "--out", str(tmp_path / "index"), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["banners"]


@pytest.mark.slow
def test_bad_apps_file_and_empty_folder(tmp_path, run_cli):
    (tmp_path / "banners").mkdir()
    (tmp_path / "apps.json").write_text('[{"appid": "ten"}]')
    r = run_cli(
        "--images", str(tmp_path / "banners"), "--out", str(tmp_path / "index"), "--apps", str(tmp_path / "apps.json")
    )
    assert r.returncode == 2 and "entry 0" in r.stderr
    r = run_cli("--images", str(tmp_path / "banners"), "--out", str(tmp_path / "index"))
    assert r.returncode == 2 and "at least 2" in r.stderr
    r = run_cli("--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "index"))
    assert r.returncode == 2 and "no such folder" in r.stderr
    assert not (tmp_path / "index").exists()


@pytest.mark.slow
def test_missing_weights_without_network(tmp_path, torch_home, run_cli, monkeypatch):
    make_catalog(tmp_path / "banners", 3)
    monkeypatch.setenv("DINO_BASE_URL", "http://127.0.0.1:9")
    r = run_cli(
        "--images",
        str(tmp_path / "banners"),
        "--out",
        str(tmp_path / "index"),
        "--strategies",
        "SimpleS16",
    )
    assert r.returncode == 1
    assert "dino_deitsmall16_pretrain.pth" in r.stderr and str(torch_home) in r.stderr
    assert not (tmp_path / "index").exists()


@pytest.mark.slow
def test_explicit_weights_path(tmp_path, torch_home, checkpoint_store, run_cli):
    make_catalog(tmp_path / "banners", 3)
    r = run_cli(
        "--images",
        str(tmp_path / "banners"),
        "--out",
        str(tmp_path / "index"),
        "--strategies",
        "SimpleS16",
        "--weights",
        str(checkpoint_store("S16")),
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert manifest["strategies"]["SimpleS16"]["checkpoint"]["sha256"] == sha256_of(checkpoint_store("S16"))


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_files(tmp_path, install_checkpoints, run_cli):
    install_checkpoints("S16")
    make_catalog(tmp_path / "banners", 10)
    (tmp_path / "banners" / "5.jpg").write_bytes(b"junk")
    common = [
        "--images",
        str(tmp_path / "banners"),
        "--strategies",
        "SimpleS16,ComplexS16",
        "--k",
        "5",
        "--batch-size",
        "1",
        "--workers",
        "0",
    ]
    ref = run_cli(*common, "--out", str(tmp_path / "reference"))
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "index"
    chunks = tmp_path / ".index.work" / "chunks"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), *common, "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    kill_after_chunks(proc, chunks, timeout=120)
    done = len(list(chunks.glob("*.npz")))
    assert 3 <= done < 10
    assert not out.exists(), "an interrupted first build must not leave an index folder"

    resumed = run_cli(*common, "--out", str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert "1 skipped" in resumed.stdout
    embedded = int(resumed.stdout.split("(")[1].split(" embedded")[0])
    assert embedded <= 10 - (done - 1)  # finished batches were not embedded again
    assert arrays_of(out) == arrays_of(tmp_path / "reference")
    assert not list(tmp_path.glob(".index.staging-*")) and not list(chunks.glob("*.npz"))


@pytest.mark.slow
def test_adding_banners_embeds_only_the_new_ones(tmp_path, install_checkpoints, run_cli):
    install_checkpoints("S16")
    make_catalog(tmp_path / "banners", 8)
    common = [
        "--images",
        str(tmp_path / "banners"),
        "--out",
        str(tmp_path / "index"),
        "--strategies",
        "SimpleS16,ComplexS16",
        "--k",
        "4",
        "--dtype",
        "float32",
    ]
    first = run_cli(*common)
    assert first.returncode == 0 and "(8 embedded, 0 reused" in first.stdout, first.stdout + first.stderr
    old = np.load(tmp_path / "index" / "ComplexS16" / "embeddings.npy")
    old_attention = np.load(tmp_path / "index" / "ComplexS16" / "attention.npy")
    for appid in (5, 500, 1000):
        make_banner(tmp_path / "banners" / f"{appid}.jpg", seed=appid)
    make_banner(tmp_path / "banners" / "10.jpg", seed=99)  # a changed banner is embedded again
    second = run_cli(*common)
    assert second.returncode == 0 and "11 images (4 embedded, 7 reused" in second.stdout, second.stdout
    index = load_index(tmp_path / "index")
    assert [a["appid"] for a in index.apps][:2] == [5, 10]
    emb = index.strategies["ComplexS16"].embeddings
    np.testing.assert_array_equal(emb[2:9], old[1:8])  # reused rows are the cached values, bit for bit
    np.testing.assert_array_equal(index.strategies["ComplexS16"].attention[2:9], old_attention[1:8])
    nothing = run_cli(*common)
    assert "(0 embedded, 11 reused" in nothing.stdout
    fresh = run_cli(*common[:2], "--out", str(tmp_path / "fresh"), *common[4:])
    assert fresh.returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "fresh" / "ComplexS16" / "embeddings.npy"), emb, atol=1e-5)


@pytest.mark.slow
def test_disk_full_while_writing_keeps_the_previous_index(tmp_path, install_checkpoints, monkeypatch):
    install_checkpoints("S16")
    make_catalog(tmp_path / "banners", 5)
    strategies = parse_strategies("SimpleS16,ComplexS16")
    cfg = BuildConfig(images=tmp_path / "banners", out=tmp_path / "index", strategies=strategies, k=2, progress=False)
    build_index(cfg)
    before = arrays_of(tmp_path / "index")
    manifest_before = (tmp_path / "index" / "manifest.json").read_bytes()
    make_banner(tmp_path / "banners" / "1000.jpg", seed=7)
    calls = {"n": 0}
    real = IndexWriter.write_array

    def failing(self, rel, array):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, rel, array)

    monkeypatch.setattr(IndexWriter, "write_array", failing)
    with pytest.raises(BuildFailed, match=r"no space left on device.*is unchanged"):
        build_index(cfg)
    assert arrays_of(tmp_path / "index") == before
    assert (tmp_path / "index" / "manifest.json").read_bytes() == manifest_before
    assert not list(tmp_path.glob(".index.staging-*"))
    monkeypatch.setattr(IndexWriter, "write_array", real)
    summary = build_index(cfg)  # the embeddings were kept: only the table writing is redone
    assert summary.rows == 6 and summary.embedded == 0


def test_recover_after_a_crash_between_the_two_renames(tmp_path):
    out = tmp_path / "index"
    staging = tmp_path / ".index.staging-123"
    old = tmp_path / ".index.old-123"
    staging.mkdir()
    (staging / "manifest.json").write_text("{}")
    old.mkdir()
    (old / "manifest.json").write_text('{"old": true}')
    assert "finished" in recover(out)
    assert (out / "manifest.json").read_text() == "{}" and not old.exists()
    out2 = tmp_path / "other"
    old2 = tmp_path / ".other.old-5"
    old2.mkdir()
    (tmp_path / ".other.staging-5").mkdir()  # incomplete: no manifest
    assert "restored" in recover(out2)
    assert out2.is_dir() and not (tmp_path / ".other.staging-5").exists()


@pytest.mark.slow
def test_device_decoding_build_matches_the_cpu_build(built_index, tmp_path, monkeypatch):
    """The device input path (here on the CPU, torchvision's decoder) gives the CPU build's index, within
    the one-level resize differences; the summary says where the time went and what was decoded where."""
    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))
    summary = build_index(
        BuildConfig(
            images=built_index.banners,
            out=tmp_path / "index",
            strategies=parse_strategies("SimpleS16"),
            k=10,
            apps_file=built_index.root / "apps.json",
            decode="device",
            progress=False,
        )
    )
    ours = np.load(tmp_path / "index" / "SimpleS16" / "embeddings.npy").astype(np.float64)
    theirs = np.load(built_index.index / "SimpleS16" / "embeddings.npy").astype(np.float64)
    assert ours.shape == theirs.shape
    assert (ours * theirs).sum(axis=1).min() > 0.999
    line = summary.breakdown()
    assert "forwards S16" in line and "24 decoded on the device" in line and "tables" in line, line
