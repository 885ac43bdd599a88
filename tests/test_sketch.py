"""The int8 sketch (core/sketch.py): its scores stay within their bounds, and the bounds are tight enough to help."""

from __future__ import annotations

import numpy as np
import pytest

from core.knn import ExactSearch
from core.sketch import Int8Sketch, sketch_fits


def normalised(x: np.ndarray, dtype) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(dtype)


def tables() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    outliers = rng.standard_normal((400, 96))
    outliers[:, [5, 40]] *= 60.0  # a few large feature dimensions, as DINO's have
    mixed = rng.standard_normal((300, 64))
    mixed[::7] = 0.0  # all-zero rows
    mixed[:, 3] = 0.0  # an all-zero column
    mixed[1] = 0.0
    mixed[1, 9] = 1.0  # a row with one non-zero value: codes at the extremes
    return {
        "random float16": normalised(rng.standard_normal((500, 128)), np.float16),
        "outlier columns float16": normalised(outliers, np.float16),
        "zeros and extremes float32": normalised(mixed, np.float32),
        "float64": normalised(rng.standard_normal((200, 48)), np.float64),
    }


def queries(table: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    dim = table.shape[1]
    spiky = np.zeros(dim)
    spiky[-1] = 1.0
    near = table[5].astype(np.float64) + 1e-3 * rng.standard_normal(dim)
    return [rng.standard_normal(dim), near, table[7].astype(np.float64), spiky, np.zeros(dim)]


@pytest.mark.parametrize("name", list(tables()))
def test_every_score_is_within_its_bound(name):
    table = tables()[name]
    sketch = Int8Sketch.of(table)
    assert sketch.kernel_is_exact()
    rng = np.random.default_rng(1)
    for q in queries(table, rng):
        norm = np.linalg.norm(q)
        unit = q / norm if norm > 0 else q
        query = sketch.coded(unit)
        approx, bound = sketch.scores(query)
        truth = (table.astype(np.longdouble) @ unit.astype(np.longdouble)).astype(np.float64)
        assert (np.abs(approx - truth) <= bound).all(), name
        assert (bound < 0.1).all(), "a bound this loose would rescore most rows"
        rows = rng.permutation(len(table))[: len(table) // 2]
        fine, fine_bound = sketch.refined(query, rows, approx[rows])
        assert (np.abs(fine - truth[rows]) <= fine_bound).all(), name
        assert (fine_bound <= bound[rows]).all()


def test_codes_use_the_int8_range_and_zero_rows_stay_zero():
    table = tables()["zeros and extremes float32"]
    sketch = Int8Sketch.of(table)
    assert sketch.codes.dtype == np.int8 and sketch.codes.shape == table.shape
    assert np.abs(sketch.codes).max() == 127 and sketch.codes.min() >= -127
    assert not sketch.codes[::7].any() and not sketch.row_scale[::7].any() and not sketch.row_error[::7].any()
    assert sketch.codes[1, 9] == 127 and sketch.row_error[1] == 0.0  # represented exactly


def test_the_kernel_sums_are_exact_at_the_int32_edge():
    rows = np.full((3, 1024), 127, np.int8)
    rows[1] = -127
    rows[2, ::2] = -127
    sketch = Int8Sketch.of(rows.astype(np.float32))
    q = np.full(1024, -127, np.int8)
    np.testing.assert_array_equal(sketch.dots(q), (rows.astype(np.int64) @ q.astype(np.int64)).astype(np.float64))
    assert sketch_fits(131_071) and not sketch_fits(131_072)
    with pytest.raises(ValueError, match="too large"):
        Int8Sketch.of(np.zeros((1, 134_000), np.float16))


def test_an_upload_search_rescores_few_rows():
    """The point of the sketch: on random rows (the worst case: scores crowd together), k = 10 rescoring
    reads a small fraction of the table, not all of it; the refined bounds cut what is left."""
    rng = np.random.default_rng(0)
    table = normalised(rng.standard_normal((8000, 256)), np.float16)
    search = ExactSearch(table)
    for _ in range(5):
        rows, _ = search._rescored(rng.standard_normal(256), 10)
        assert 10 <= rows.size <= 40  # of 8,000 (12-22 here)


def test_the_index_loader_checks_the_sketch_and_does_without_one(built_index, tmp_path):
    import json
    import shutil

    from core.index import IndexInvalid, load_index

    bad = tmp_path / "index"
    shutil.copytree(built_index.index, bad)
    rows_path = bad / "ComplexS16" / "sketch" / "rows.npy"
    rows = np.load(rows_path)
    rows[1, 3] = -1.0  # a negative error norm: every bound would be wrong
    np.save(rows_path, rows)
    with pytest.raises(IndexInvalid, match="sha256"):
        load_index(bad)
    with pytest.raises(IndexInvalid, match="not finite and positive"):
        load_index(bad, verify="quick")
    np.save(rows_path, rows[:, :5])
    with pytest.raises(IndexInvalid, match=r"rows.npy: shape \(3, 5\)"):
        load_index(bad, verify="quick")
    manifest = json.loads((bad / "manifest.json").read_text())
    del manifest["strategies"]["ComplexS16"]["sketch"]  # an index from before sketches
    (bad / "manifest.json").write_text(json.dumps(manifest))
    index = load_index(bad, verify="quick")
    assert index.strategies["ComplexS16"].sketch is None and index.strategies["SimpleS16"].sketch is not None
    table = index.strategies["ComplexS16"].embeddings
    search = ExactSearch(table)  # made in memory, as the service does then
    assert search._sketch is not None  # the int8 prefilter runs
    q = np.asarray(table[3], dtype=np.float64)
    assert search.search(q, 4)[0].tolist() == ExactSearch(table, sketch=Int8Sketch.of(table)).search(q, 4)[0].tolist()
    with pytest.raises(ValueError, match="shape"):
        ExactSearch(table, sketch=index.strategies["SimpleS16"].sketch)
