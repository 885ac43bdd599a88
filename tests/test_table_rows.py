"""RowReader (core/table_rows.py): the same values as indexing the table, without mapping its pages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from core.table_rows import RowReader
from devtools.cgroup import memory_of


def mapped_kib(path: Path) -> float:
    """This process's resident memory in the mappings of ``path`` (devtools.cgroup.memory_of, from /proc)."""
    return memory_of(os.getpid(), path)["tables_rss"] * 1024


@pytest.fixture
def stored(tmp_path):
    table = np.random.default_rng(0).integers(-1000, 1000, (5000, 100), dtype=np.int32)
    path = tmp_path / "neighbours.npy"
    np.save(path, table)
    return table, path


def test_reads_equal_indexing_and_map_nothing(stored):
    table, path = stored
    mapped = np.load(path, mmap_mode="r")
    reader = RowReader(mapped)
    assert reader._fd is not None  # rows come from pread
    rng = np.random.default_rng(1)
    for row in rng.integers(0, 5000, 300).tolist():
        np.testing.assert_array_equal(reader.part(row, 3, 13), table[row, 3:13])
    rows = np.array([7, 8, 9, 4000, 12, 13, 4999, 0])  # runs and single rows, in any order
    np.testing.assert_array_equal(reader.rows(rows), table[rows])
    np.testing.assert_array_equal(reader.column(0), table[:, 0])
    np.testing.assert_array_equal(reader.part(5, 95, 200), table[5, 95:])  # clipped like a slice
    assert reader.part(5, 100, 110).size == 0
    if Path("/proc/self/smaps").exists():
        assert mapped_kib(path) == 0, "reading rows must not map the file's pages"


def test_rows_of_more_dimensions(tmp_path):
    maps = np.random.default_rng(3).random((300, 14, 21)).astype(np.float16)  # attention maps: a row is a grid
    path = tmp_path / "attention.npy"
    np.save(path, maps)
    reader = RowReader(np.load(path, mmap_mode="r"))
    assert reader._fd is not None
    rows = np.array([299, 0, 17, 18])
    np.testing.assert_array_equal(reader.rows(rows), maps[rows])
    if Path("/proc/self/smaps").exists():
        assert mapped_kib(path) == 0


def test_views_and_arrays_in_memory_are_indexed(stored):
    table, path = stored
    view = np.load(path, mmap_mode="r")[10:20]
    for source in (view, table):
        reader = RowReader(source)
        assert reader._fd is None  # ordinary indexing
        np.testing.assert_array_equal(reader.part(2, 0, 5), source[2, :5])
        np.testing.assert_array_equal(reader.rows(np.array([1, 3])), source[[1, 3]])
        np.testing.assert_array_equal(reader.column(4), source[:, 4])


def test_bad_rows_and_a_changed_file_are_errors(stored):
    _, path = stored
    reader = RowReader(np.load(path, mmap_mode="r"))
    with pytest.raises(IndexError):
        reader.part(5000, 0, 3)
    with pytest.raises(IndexError):
        reader.rows(np.array([1, -1]))
    with open(path, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(OSError, match="short read"):
        reader.part(4000, 0, 10)


def test_an_upload_search_with_a_stored_sketch_maps_no_embeddings(tmp_path):
    from core.knn import ExactSearch
    from core.sketch import Int8Sketch

    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 64))
    table = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    path = tmp_path / "embeddings.npy"
    np.save(path, table)
    search = ExactSearch(np.load(path, mmap_mode="r"), sketch=Int8Sketch.of(table))
    q = rng.standard_normal(64)
    rows, _ = search.search(q, 5)
    exact = table.astype(np.float64) @ q
    assert rows.tolist() == np.lexsort((np.arange(3000), -exact))[:5].tolist()
    if Path("/proc/self/smaps").exists():
        assert mapped_kib(path) == 0


def test_rows_of_no_elements(tmp_path):
    """A table without neighbours (k = 0) has rows of no elements: they read as empty, not as an error."""
    np.save(tmp_path / "neighbours.npy", np.empty((5, 0), np.int32))
    reader = RowReader(np.load(tmp_path / "neighbours.npy", mmap_mode="r"))
    assert reader.part(3, 0, 10).shape == (0,)
    assert reader.rows(np.array([0, 4])).shape == (2, 0)
