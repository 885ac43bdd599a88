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
