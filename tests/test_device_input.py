"""The device input path on the CPU: tensor preprocessing against Pillow, routing of files, fallbacks,
one batch prepared ahead, and the float64 tables of core.knn_device against core.knn.

The same code runs on CUDA with nvJPEG (``bench/gpu_build.py`` exercises it there); here the decoder
is torchvision's CPU one, or a fake that refuses some files.
"""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from conftest import make_banner
from PIL import Image

from core.dino.device_input import DeviceBatches, nvjpeg_decoder, plain_jpeg
from core.dino.extract import Extractor
from core.dino.preprocess import PREPROCESSINGS
from core.dino.strategies import parse_strategies
from core.dino.timing import StageTimer
from core.dino.weights import ModelCache
from core.images import DEFAULT_MAX_PIXELS, ImageRejected, open_image
from core.knn import topk_table
from core.knn_device import topk_table_device
from devtools.synthetic import synthetic_banner, textured_banner_jpeg

CPU = torch.device("cpu")


def grainy(size: tuple[int, int], seed: int = 1) -> Image.Image:
    return Image.open(io.BytesIO(textured_banner_jpeg(seed, size))).convert("RGB")


@pytest.mark.parametrize("size", [(600, 900), (300, 450), (257, 300), (100, 150)])
def test_tensor_preprocessing_matches_pillow_within_one_level(size):
    img = grainy(size)
    for prep in PREPROCESSINGS.values():
        want = prep.transform()(img)
        got = prep.tensor_transform(torch.from_numpy(np.array(img)).permute(2, 0, 1)[None])[0]  # pil_to_tensor
        levels = (got - want).abs() * torch.tensor(prep.std)[:, None, None] * 255
        assert got.shape == want.shape
        assert float(levels.max()) < 1.01, prep.name
        assert float((levels > 1e-3).float().mean()) < 1e-3, prep.name  # a float pass alone: about 0.14


@pytest.mark.slow  # importing torchvision takes seconds (as in every test here that uses it)
@pytest.mark.parametrize("size", [(600, 900), (900, 600), (257, 300), (1000, 333), (99, 101)])
def test_resized_size_is_torchvisions(size):
    from torchvision import transforms as T

    img = Image.new("RGB", size)
    prep = PREPROCESSINGS["dino"]
    w, h = T.Resize(256)(img).size
    assert prep.resized_size(size[1], size[0]) == (h, w)


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_only_plain_jpegs_go_to_the_device_decoder():
    img = synthetic_banner(3)
    plain = jpeg(img, quality=90)
    assert plain_jpeg(plain, DEFAULT_MAX_PIXELS)
    assert plain_jpeg(jpeg(img, progressive=True), DEFAULT_MAX_PIXELS)
    assert plain_jpeg(jpeg(img.convert("L")), DEFAULT_MAX_PIXELS)
    exif = Image.Exif()
    exif[0x0112] = 1
    assert plain_jpeg(jpeg(img, exif=exif), DEFAULT_MAX_PIXELS)
    exif[0x0112] = 6  # rotated: Pillow's path applies it
    assert not plain_jpeg(jpeg(img, exif=exif), DEFAULT_MAX_PIXELS)
    assert not plain_jpeg(jpeg(img.convert("CMYK")), DEFAULT_MAX_PIXELS)
    assert not plain_jpeg(plain[:2000], DEFAULT_MAX_PIXELS)  # truncated
    assert not plain_jpeg(plain, max_pixels=300 * 450 - 1)
    png = io.BytesIO()
    img.save(png, format="PNG")
    assert not plain_jpeg(png.getvalue(), DEFAULT_MAX_PIXELS)
    assert not plain_jpeg(b"\xff\xd8\xff\xe0 not a jpeg", DEFAULT_MAX_PIXELS)
    # what open_image refuses for its geometry or decoding work goes to the CPU path, which refuses it
    assert not plain_jpeg(jpeg(Image.new("RGB", (30, 900))), DEFAULT_MAX_PIXELS)  # 30:1
    assert plain_jpeg(jpeg(Image.new("RGB", (40, 600))), DEFAULT_MAX_PIXELS)  # 15:1
    dino = PREPROCESSINGS["dino"].pil_resized_size  # 256 on the short edge: 15:1 of a 2000-wide image is fine
    assert plain_jpeg(jpeg(Image.new("RGB", (150, 2000))), DEFAULT_MAX_PIXELS, dino)
    assert not plain_jpeg(jpeg(Image.new("RGB", (150, 2000))), DEFAULT_MAX_PIXELS, lambda w, h: (w * 8, h * 8))
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    assert plain_jpeg(plain[:-2] + empty_scan * 10 + b"\xff\xd9", DEFAULT_MAX_PIXELS)
    assert not plain_jpeg(plain[:-2] + empty_scan * 70 + b"\xff\xd9", DEFAULT_MAX_PIXELS)  # over 64 scans
    tall = jpeg(Image.new("RGB", (447, 8940)), progressive=True)  # its coefficients are over a 4 Mpx cap's budget
    assert not plain_jpeg(tall, 4_000_000, dino)
    with pytest.raises(ImageRejected, match="progressive JPEG takes"):
        open_image(tall, max_pixels=4_000_000, resize_to=dino)
    assert plain_jpeg(jpeg(Image.new("RGB", (447, 8940))), 4_000_000, dino)  # the same, baseline


@pytest.fixture
def mixed_files(tmp_path):
    """JPEGs, a PNG, a rotated JPEG, a corrupt, a truncated and a missing file; index -> expected route."""
    files = [make_banner(tmp_path / f"{i}.jpg", seed=i) for i in range(5)]
    files.insert(2, make_banner(tmp_path / "p.png", seed=7))
    exif = Image.Exif()
    exif[0x0112] = 8
    synthetic_banner(8).save(tmp_path / "rot.jpg", exif=exif)
    files.append(tmp_path / "rot.jpg")
    Image.new("RGB", (30, 900), "gray").save(tmp_path / "thin.jpg")  # 30:1, over the aspect-ratio limit
    files.append(tmp_path / "thin.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "trunc.jpg").write_bytes(files[0].read_bytes()[:1500])
    return [*files, tmp_path / "bad.jpg", tmp_path / "trunc.jpg", tmp_path / "missing.jpg"]


def batches(files, decoder, batch_size=3, timer=None):
    preps = [PREPROCESSINGS["dino"], PREPROCESSINGS["full"]]
    return DeviceBatches(
        files,
        preps,
        CPU,
        batch_size=batch_size,
        decoder=decoder,
        read_workers=2,
        max_pixels=DEFAULT_MAX_PIXELS,
        timer=timer,
    )


@pytest.mark.slow
def test_fallbacks_are_the_cpu_path_and_counted(mixed_files):
    refuse = {mixed_files[4].read_bytes()}  # a JPEG the "device" decoder refuses
    real = nvjpeg_decoder(CPU)
    calls = []

    def fake(datas):
        calls.append(len(datas))
        if any(bytes(d.numpy()) in refuse for d in datas):
            raise RuntimeError("nvjpeg refused it")
        return real(datas)

    timer = StageTimer()
    rows, failures = {}, {}
    for b in batches(mixed_files, fake, timer=timer):
        assert [t.shape[0] for t in b.tensors] == [len(b.indices)] * 2
        for r, i in enumerate(b.indices):
            rows[i] = [t[r] for t in b.tensors]
        failures.update(dict(b.failures))
    assert sorted(failures) == [7, 8, 9, 10]
    with pytest.raises(ImageRejected) as refused:  # the CPU path's refusal, word for word
        open_image(mixed_files[7])
    assert failures[7] == f"extreme_aspect_ratio: {refused.value.message}"
    assert failures[8].startswith(("not_an_image", "corrupt_image")) and failures[9].startswith("corrupt_image")
    assert failures[10].startswith("unreadable")
    assert sorted(rows) == list(range(7))
    # 5 JPEGs less the refused one on the "device"; the PNG, the rotated JPEG, the refused one, the thin
    # one and the two broken files on the CPU path
    assert timer.counts["decoded on the device"] == 4 and timer.counts["decoded on the CPU"] == 6
    assert 1 in calls  # the refused batch was retried file by file
    for i in (2, 4, 6):  # through Pillow: exactly the CPU path
        want = [p.transform()(open_image(mixed_files[i])) for p in (PREPROCESSINGS["dino"], PREPROCESSINGS["full"])]
        assert all(torch.equal(a, b) for a, b in zip(rows[i], want, strict=True))
    rotated = PREPROCESSINGS["dino"].transform()(open_image(mixed_files[6]))
    assert rotated.shape == rows[6][0].shape
    for i in (0, 1, 3, 5):  # decoded as tensors: within a level of Pillow
        want = PREPROCESSINGS["dino"].transform()(open_image(mixed_files[i]))
        assert float((rows[i][0] - want).abs().max()) < 1.01 / (255 * 0.224)


@pytest.mark.slow
def test_the_next_batch_is_prepared_while_one_is_used(tmp_path):
    files = [make_banner(tmp_path / f"{i}.jpg", seed=i) for i in range(6)]
    real = nvjpeg_decoder(CPU)
    started = [threading.Event() for _ in range(3)]
    calls = iter(range(3))

    def fake(datas):
        out = real(datas)
        started[next(calls)].set()
        return out

    seen = 0
    for b in batches(files, fake, batch_size=2):
        nxt = seen + 1
        if nxt < 3:  # batch nxt is decoded without the caller asking for it
            assert started[nxt].wait(timeout=60)
        seen += 1
        assert len(b.indices) == 2
    assert seen == 3


@pytest.mark.slow
def test_device_path_equals_cpu_path_and_queues_forwards_ahead(install_checkpoints, mixed_files, monkeypatch):
    install_checkpoints("S16")
    ex = Extractor(parse_strategies("SimpleS16,ComplexS16@full"), models=ModelCache())
    assert ex.default_decode() == "cpu"
    results = {}
    for decode in ("cpu", "device"):
        rows, failures = {}, {}
        for b in ex.iter_files(mixed_files, batch_size=3, num_workers=0, decode=decode):
            rows.update({i: {k: v[j] for k, v in b.features.items()} for j, i in enumerate(b.indices)})
            failures.update(dict(b.failures))
        results[decode] = rows, failures
    assert results["cpu"][1] == results["device"][1]
    assert sorted(results["cpu"][0]) == sorted(results["device"][0])
    for i, feats in results["cpu"][0].items():
        for name, vec in feats.items():
            assert float(vec @ results["device"][0][i][name]) > 0.9999, (i, name)
    log = []
    forward = ex._forward
    monkeypatch.setattr(ex, "_forward", lambda tensors, timer=None: log.append("forward") or forward(tensors, timer))
    for b in ex.iter_files(mixed_files[:6], batch_size=2, decode="device"):
        log.append(f"batch {b.indices[0]}")
    assert log == ["forward", "forward", "batch 0", "forward", "batch 2", "batch 4"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_device_tables_equal_the_cpu_tables(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 48))
    x[[10, 20, 30]] = x[5]  # exact ties: lower row first
    x[40] = -x[5]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)
    want = topk_table(x, 25)
    for chunk in (None, 7):
        got = topk_table_device(x, 25, "cpu", chunk_rows=chunk)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
        assert got[0].dtype == np.int32 and got[1].dtype == np.float32
    assert list(want[0][5][:3]) == [10, 20, 30]
    assert topk_table_device(x[:1], 5, "cpu")[0].shape == (1, 0)
    bad = x.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        topk_table_device(bad, 5, "cpu")


def test_device_tables_with_many_ties_at_the_boundary():
    x = np.zeros((300, 8), np.float32)
    x[:, 0] = 1.0  # every row identical: all scores tie, so every row needs its full sort
    x[150:, 1] = 1e-3
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = topk_table_device(x, 5, "cpu")
    want = topk_table(x, 5)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
