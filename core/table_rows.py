"""Rows of a memory-mapped table, read with ``pread`` instead of through the mapping.

Touching a row of a mapping maps a page-cache folio around it, so random lookups would leave every table mapped
and counted in each worker's RSS (what the host meters); ``pread`` reads the same page cache and maps nothing.
Other arrays are read by indexing.
"""

from __future__ import annotations

import mmap
import os
import weakref

import numpy as np

_CHUNK_BYTES = 1 << 22  # whole-column reads go a few MB at a time


class RowReader:
    """Reads rows (or parts of rows) of one 2-D C-ordered table; safe from many threads and after fork."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.shape = table.shape
        self.dtype = table.dtype
        self._fd: int | None = None
        whole_file = isinstance(table, np.memmap) and isinstance(table.base, mmap.mmap) and table.filename
        if whole_file and table.ndim == 2 and table.flags.c_contiguous:
            self._fd = os.open(table.filename, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            weakref.finalize(self, os.close, self._fd)
            self._offset = int(table.offset)
            self._row_bytes = table.shape[1] * table.dtype.itemsize

    @property
    def reads_files(self) -> bool:
        """Whether rows come from ``pread`` (else from ordinary indexing)."""
        return self._fd is not None

    def part(self, row: int, start: int, stop: int) -> np.ndarray:
        """``table[row, start:stop]`` (clipped to the row), as a new array."""
        start, stop, _ = slice(start, stop).indices(self.shape[1])
        if self._fd is None:
            return np.array(self.table[row, start:stop])
        if not 0 <= row < self.shape[0]:
            raise IndexError(f"row {row} is out of range for {self.shape[0]} rows")
        out = np.empty(max(0, stop - start), dtype=self.dtype)
        self._read_into(memoryview(out).cast("B"), self._offset + row * self._row_bytes + start * self.dtype.itemsize)
        return out

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """``table[rows]`` for an int array of row indices, as a new (len(rows), D) array."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._fd is None:
            return np.asarray(self.table[rows])
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"row indices out of range for {self.shape[0]} rows")
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        into, size, offset = memoryview(out).cast("B"), self._row_bytes, self._offset
        for i, row in enumerate(rows.tolist()):
            self._read_into(into[i * size : (i + 1) * size], offset + row * size)
        return out

    def column(self, j: int) -> np.ndarray:
        """``table[:, j]``, reading the file a few MB at a time (for one-off summaries of a whole table)."""
        if self._fd is None:
            return np.array(self.table[:, j])
        step = max(1, _CHUNK_BYTES // self._row_bytes)
        out = np.empty(self.shape[0], dtype=self.dtype)
        for first in range(0, self.shape[0], step):
            count = min(step, self.shape[0] - first)
            block = np.empty((count, self.shape[1]), dtype=self.dtype)
            self._read_into(memoryview(block).cast("B"), self._offset + first * self._row_bytes)
            out[first : first + count] = block[:, j]
        return out

    def _read_into(self, view: memoryview, at: int) -> None:
        """Fill ``view`` (bytes of a result array) with the file's bytes from ``at``: one read, no bytes object."""
        if os.preadv(self._fd, [view], at) != view.nbytes:
            raise OSError(f"{self.table.filename}: short read at byte {at} (the file changed on disk?)")
