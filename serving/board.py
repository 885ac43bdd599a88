"""The workers' shared table: each worker's pid, state and open connections (docs/serving.md).

An anonymous shared mapping made in the gunicorn master before the first fork; each row is written only by its
worker, so no lock is needed, and a killed worker's row is known by its pid being gone.
"""

from __future__ import annotations

import mmap
import os
import time

from core.cpu import pid_alive

FREE, BOOTING, READY, STOPPING = 0, 1, 2, 3
_FIELDS = 3


class Board:
    def __init__(self, rows: int = 64) -> None:
        self.rows = rows
        # row 0 is a header: [rows ever claimed, 0, 0]; workers use rows 1..rows
        self._mem = mmap.mmap(-1, (rows + 1) * _FIELDS * 4)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
        self._v = memoryview(self._mem).cast("i")
        self._alive_at: dict[int, tuple[float, bool]] = {}

    def claim(self) -> int:
        """In the master: a free row for a worker about to be forked (rows of dead workers are reused)."""
        for row in range(1, self.rows + 1):
            base = row * _FIELDS
            if self._v[base + 1] == FREE or (self._v[base] > 0 and not pid_alive(self._v[base])):
                self._v[base], self._v[base + 1], self._v[base + 2] = 0, BOOTING, 0
                self._v[0] = max(self._v[0], row)
                return row
        raise RuntimeError(f"more than {self.rows} gunicorn workers: no row left in the board")

    def set(self, row: int, state: int, conns: int) -> None:
        """In a worker, its own row."""
        base = row * _FIELDS
        self._v[base], self._v[base + 1], self._v[base + 2] = os.getpid(), state, conns

    def set_conns(self, row: int, conns: int) -> None:
        self._v[row * _FIELDS + 2] = conns

    def ready(self) -> list[tuple[int, int, int]]:
        """(row, pid, connections) of the live workers that serve."""
        out = []
        for row in range(1, self._v[0] + 1):
            base = row * _FIELDS
            if self._v[base + 1] == READY and self._alive(self._v[base]):
                out.append((row, self._v[base], self._v[base + 2]))
        return out

    def _alive(self, pid: int, max_age: float = 0.1) -> bool:
        """Whether a worker still exists (a SIGKILLed one cannot clear its row), checked every max_age s."""
        now = time.monotonic()
        checked = self._alive_at.get(pid)
        if checked is None or now - checked[0] > max_age:
            checked = (now, pid_alive(pid))
            if len(self._alive_at) > 4 * self.rows:
                self._alive_at.clear()
            self._alive_at[pid] = checked
        return checked[1]

    def fewest_connections_elsewhere(self, row: int) -> int | None:
        """The smallest connection count among the other serving workers (None: no other serves)."""
        others = [conns for r, _, conns in self.ready() if r != row]
        return min(others) if others else None
