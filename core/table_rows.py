"""Rows of a memory-mapped table, read with ``pread`` instead of through the mapping (other arrays: by indexing).

Touching a row of a mapping maps a page-cache folio around it, so random lookups would leave every table mapped
and counted in each worker's RSS (what the host meters); ``pread`` reads the same page cache and maps nothing.
"""

from __future__ import annotations

import mmap
import os
import weakref

import numpy as np

_CHUNK_BYTES = 1 << 22  # whole-column reads go a few MB at a time


class RowReader:
    """Reads rows (or parts of rows) of one C-ordered table of two or more dimensions (a row: ``table[i]``); safe
    from many threads and after fork."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self._fd: int | None = None
        whole_file = isinstance(table, np.memmap) and isinstance(table.base, mmap.mmap) and table.filename
        if whole_file and table.ndim >= 2 and table.flags.c_contiguous:
            self._fd = os.open(table.filename, os.O_RDONLY | os.O_CLOEXEC)
            weakref.finalize(self, os.close, self._fd)
            self._offset = int(table.offset)
            self._row_bytes = table.strides[0]

    def part(self, row: int, start: int, stop: int) -> np.ndarray:
        """``table[row, start:stop]`` (clipped to the row), as a new array."""
        return self.rows(np.array([row]))[0, start:stop]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """``table[rows]`` for an int array of row indices, as a new array."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._fd is None:
            return np.asarray(self.table[rows])
        if rows.size and (rows.min() < 0 or rows.max() >= len(self.table)):
            raise IndexError(f"row indices out of range for {len(self.table)} rows")
        out = np.empty((rows.size, *self.table.shape[1:]), dtype=self.table.dtype)
        for i, row in enumerate(rows.tolist()):
            self._read(row, 1, out[i : i + 1])
        return out

    def column(self, j: int) -> np.ndarray:
        """``table[:, j]``, reading the file a few MB at a time (for one-off summaries of a whole table)."""
        if self._fd is None:
            return np.array(self.table[:, j])
        n = len(self.table)
        step = max(1, _CHUNK_BYTES // self._row_bytes)
        return np.concatenate([self._read(first, min(step, n - first))[:, j] for first in range(0, n, step)])

    def _read(self, first: int, count: int, out: np.ndarray | None = None) -> np.ndarray:
        """``count`` rows from row ``first`` of the file: one read, into ``out`` (C-ordered) or a new array."""
        if out is None:
            out = np.empty((count, *self.table.shape[1:]), dtype=self.table.dtype)
        at = self._offset + first * self._row_bytes
        if out.nbytes == 0:  # rows of no elements (a table with k = 0): nothing to read, and no view to cast
            return out
        if os.preadv(self._fd, [memoryview(out).cast("B")], at) != out.nbytes:
            raise OSError(f"{self.table.filename}: short read at byte {at} (the file changed on disk?)")
        return out
