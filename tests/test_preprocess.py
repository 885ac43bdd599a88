"""Preprocessing modes: the official DINO pipeline to the bit, and the two banner-shaped modes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FIXTURES, make_banner
from PIL import Image

from core.dino.preprocess import PREPROCESSINGS, Preprocessing, get_preprocessing
from core.images import open_image


def test_dino_mode_equals_official_preprocessing():
    fx = json.loads((FIXTURES / "dino" / "fixture.json").read_text())["preprocessed_dino"]
    want = np.load(FIXTURES / "dino" / fx["file"])
    transform = PREPROCESSINGS["dino"].transform()
    got = np.stack([transform(open_image(FIXTURES / "dino" / p)).numpy() for p in fx["images"]])
    assert got.shape == want.shape == (len(fx["images"]), 3, 224, 224)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("mode", "size"), [("dino", (224, 224)), ("square", (224, 224)), ("full", (336, 224))])
def test_output_sizes(tmp_path, mode, size):
    img = open_image(make_banner(tmp_path / "b.jpg", seed=1))
    x = PREPROCESSINGS[mode].transform()(img)
    assert tuple(x.shape) == (3, *size) == (3, *PREPROCESSINGS[mode].output_size)
    for patch in (8, 14, 16):
        assert size[0] % patch == 0 and size[1] % patch == 0


def test_square_and_full_keep_the_whole_banner(tmp_path):
    """A banner whose top and bottom rows differ: dino crops them away, square and full keep them."""
    arr = np.full((450, 300, 3), 128, np.uint8)
    arr[:40] = 255
    arr[-40:] = 0
    img = Image.fromarray(arr)
    top = {m: PREPROCESSINGS[m].transform()(img)[:, 0].mean().item() for m in PREPROCESSINGS}
    assert top["square"] > 1.5 and top["full"] > 1.5  # white rows, normalised
    assert abs(top["dino"] - top["square"]) > 1.0  # the centre crop starts in the grey middle


def test_full_mode_keeps_the_aspect_ratio_of_banners():
    prep = PREPROCESSINGS["full"]
    h, w = prep.output_size
    assert h / w == pytest.approx(450 / 300)


def test_manifest_round_trip_and_validation():
    for prep in PREPROCESSINGS.values():
        entry = json.loads(json.dumps(prep.to_manifest()))
        assert Preprocessing.from_manifest(entry) == prep
    bad = PREPROCESSINGS["dino"].to_manifest() | {"interpolation": "sideways"}
    with pytest.raises(ValueError, match="invalid preprocessing"):
        Preprocessing.from_manifest(bad)
    with pytest.raises(ValueError, match="invalid preprocessing"):
        Preprocessing.from_manifest({"name": "dino"})
    with pytest.raises(ValueError, match="unknown preprocessing 'fisheye'"):
        get_preprocessing("fisheye")


@pytest.mark.parametrize(
    "prep",
    [
        *PREPROCESSINGS.values(),
        Preprocessing("lanczos", resize=100, crop=(120, 90), interpolation="lanczos"),  # crop > image: padded
        Preprocessing("nearest", resize=(50, 60), crop=(55, 61), interpolation="nearest"),
        Preprocessing("bilinear", resize=224, crop=(224, 224), interpolation="bilinear"),
    ],
    ids=lambda p: p.name,
)
@pytest.mark.slow  # importing torchvision takes seconds
def test_transform_is_torchvisions_bit_for_bit(prep):
    """Our PIL pipeline (no torchvision import) against torchvision's Resize, CenterCrop, ToTensor, Normalize."""
    import torch
    from torchvision import transforms as T

    steps = [
        T.Resize(
            prep.resize if isinstance(prep.resize, int) else list(prep.resize), T.InterpolationMode(prep.interpolation)
        )
    ]
    steps += [T.CenterCrop(list(prep.crop))] if prep.crop is not None else []
    reference = T.Compose([*steps, T.ToTensor(), T.Normalize(prep.mean, prep.std)])
    rng = np.random.default_rng(0)
    for width, height in [(300, 450), (256, 256), (224, 224), (1000, 333), (31, 77), (257, 256)]:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        want, got = reference(img), prep.transform()(img)
        assert got.dtype == want.dtype and torch.equal(got, want), (prep.name, width, height)


@pytest.mark.slow
def test_tensor_crop_and_normalize_are_torchvisions():
    import torch
    from torchvision.transforms import functional as TF

    from core.dino.preprocess import _center_crop_tensor, _normalize

    x = torch.rand(2, 3, 100, 80) * 255
    for crop in [(50, 40), (100, 80), (120, 90), (33, 79), (7, 200)]:
        assert torch.equal(_center_crop_tensor(x, crop), TF.center_crop(x, list(crop))), crop
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    assert torch.equal(_normalize(x.clone(), mean, std), TF.normalize(x.clone(), mean, std))
