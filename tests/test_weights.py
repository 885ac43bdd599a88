"""Checkpoint resolution: cache hit without network, download from a local server, clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import sha256_of

from core.dino import weights
from core.dino.backbones import BACKBONES
from core.dino.weights import (
    ModelCache,
    WeightsMismatch,
    WeightsUnavailable,
    checkpoint_dir,
    fetch_checkpoint,
    load_model,
    resolve_checkpoint,
)
from core.files import sha256_file

S16 = BACKBONES["S16"]


@pytest.mark.parametrize("code", ["S16", "S8", "B16", "B8"])
def test_strict_loading_of_official_layout(code, checkpoint_store):
    path = checkpoint_store(code)
    model = load_model(BACKBONES[code], path)
    assert not model.training
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.pos_embed, state["pos_embed"])


def test_loading_rejects_another_architecture(checkpoint_store, tmp_path):
    bad = tmp_path / "wrong.pth"
    shutil.copy(checkpoint_store("S16"), bad)
    with pytest.raises(WeightsUnavailable, match="not a loadable DINO ViT-B/16 checkpoint"):
        load_model(BACKBONES["B16"], bad)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailable, match="not a loadable"):
        load_model(S16, tmp_path / "junk.pth")


def test_full_training_checkpoint_teacher_is_used(checkpoint_store, tmp_path):
    state = torch.load(checkpoint_store("S16"), weights_only=True)
    teacher = {f"backbone.{k}": v for k, v in state.items()} | {"head.mlp.0.weight": torch.zeros(2, 2)}
    path = tmp_path / "full.pth"
    torch.save({"teacher": teacher, "student": {}, "epoch": 3}, path)
    model = load_model(S16, path)
    assert torch.equal(model.cls_token, state["cls_token"])


def test_cache_hit_uses_no_network(install_checkpoints, monkeypatch):
    installed = install_checkpoints("S16")["S16"]
    monkeypatch.setattr(weights.requests, "get", lambda *a, **k: pytest.fail("network used"))
    assert resolve_checkpoint(S16) == installed
    assert installed.parent == checkpoint_dir()


def test_download_from_local_server_with_sha256(torch_home, checkpoint_store, file_server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "dino_deitsmall16_pretrain").mkdir(parents=True)
    src = checkpoint_store("S16")
    shutil.copy(src, mirror / S16.checkpoint)
    monkeypatch.setenv("DINO_BASE_URL", file_server(mirror) + "/")
    path = resolve_checkpoint(S16, progress=False)
    assert path == torch_home / "dino_deitsmall16_pretrain.pth"
    assert sha256_file(path, cache=True) == sha256_of(src)
    assert not [p for p in torch_home.iterdir() if p.name.startswith(".")], "temporary files left behind"
    loaded = ModelCache().get(S16, expected_sha256=sha256_of(src))
    assert loaded.sha256 == sha256_of(src)


def test_missing_everywhere_gives_a_clear_error(torch_home, monkeypatch, file_server, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DINO_BASE_URL", file_server(empty))
    with pytest.raises(WeightsUnavailable) as e:
        resolve_checkpoint(S16, progress=False)
    msg = str(e.value)
    assert "dino_deitsmall16_pretrain.pth" in msg and str(torch_home) in msg and "404" in msg
    assert not list(torch_home.iterdir()), "a failed download must leave nothing behind"
    with pytest.raises(WeightsUnavailable, match="is not in"):
        resolve_checkpoint(S16, download=False)


def test_no_network_at_all(torch_home, monkeypatch):
    monkeypatch.setenv("DINO_BASE_URL", "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(WeightsUnavailable, match="could not be downloaded") as e:
        resolve_checkpoint(S16, progress=False)
    assert f"put it at {torch_home / S16.filename}" in str(e.value)


def test_explicit_weights_path(checkpoint_store, tmp_path, torch_home):
    assert resolve_checkpoint(S16, checkpoint_store("S16")) == checkpoint_store("S16")
    with pytest.raises(WeightsUnavailable, match="no such file"):
        resolve_checkpoint(S16, tmp_path / "nope.pth")


def test_model_cache_loads_once_and_checks_sha(install_checkpoints):
    install_checkpoints("S16")
    cache = ModelCache()
    a = cache.get(S16)
    b = cache.get(S16)
    assert a is b and a.model is b.model
    with pytest.raises(WeightsUnavailable, match="index was built with"):
        cache.get(S16, expected_sha256="0" * 64)


def test_model_cache_concurrent_first_use(install_checkpoints):
    import threading

    install_checkpoints("S16")
    cache = ModelCache()
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.get(S16))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 4 and all(g is got[0] for g in got)


def test_weights_are_mapped_from_the_file_not_copied(checkpoint_store):
    path = checkpoint_store("S16")
    model = load_model(S16, path)
    assert str(path) in Path("/proc/self/maps").read_text(), "the weights must be the file's pages"
    assert torch.equal(model.cls_token, torch.load(path, weights_only=True)["cls_token"])


def test_legacy_format_is_converted_once_then_mapped(checkpoint_store, torch_home, tmp_path):
    state = torch.load(checkpoint_store("S16"), weights_only=True)
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    model = load_model(S16, legacy)
    (converted,) = (torch_home / "mmap").iterdir()
    assert converted.name == f"{sha256_of(legacy)[:16]}-legacy.pth"
    assert str(converted) in Path("/proc/self/maps").read_text()
    assert torch.equal(model.pos_embed, state["pos_embed"])
    stamp = converted.stat().st_mtime_ns
    load_model(S16, legacy)
    assert converted.stat().st_mtime_ns == stamp, "converted once"


def test_fetch_checkpoint_verifies_against_the_index(torch_home, checkpoint_store, file_server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "dino_deitsmall16_pretrain").mkdir(parents=True)
    src = checkpoint_store("S16")
    shutil.copy(src, mirror / S16.checkpoint)
    monkeypatch.setenv("DINO_BASE_URL", file_server(mirror))
    with pytest.raises(WeightsMismatch, match="index was built with"):
        fetch_checkpoint(S16, "0" * 64, attempts=3, backoff_s=0)
    assert fetch_checkpoint(S16, sha256_of(src), attempts=1) == torch_home / S16.filename
    monkeypatch.setenv("DINO_BASE_URL", "http://127.0.0.1:9")  # already in place: no network needed
    assert fetch_checkpoint(S16, sha256_of(src), attempts=1).is_file()
