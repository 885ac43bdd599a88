"""A table in shared memory where the workers say whether they serve and how many connections they hold.

Created in the gunicorn master before any worker is forked (an anonymous shared mapping), so every
worker sees every other's row: ``/health`` reads it to answer 200 only when all the configured
workers serve, and each worker reads it to keep the connections balanced (see ``serving.worker``).
A row is three 32-bit integers: pid, state, open connections. Rows are claimed by the master
(single-threaded) and written only by the worker that owns them, so no lock is needed; a worker
killed without cleaning up is recognised by its pid no longer existing.
"""

from __future__ import annotations

import mmap
import os
import time

from core.cpu import pid_alive

FREE, BOOTING, READY, STOPPING = 0, 1, 2, 3
ROWS = 64
_FIELDS = 3


class Board:
    def __init__(self, rows: int = ROWS) -> None:
        self.rows = rows
        # row 0 is a header: [rows ever claimed, 0, 0]; workers use rows 1..rows
        self._mem = mmap.mmap(-1, (rows + 1) * _FIELDS * 4)  # MAP_SHARED | MAP_ANONYMOUS: survives fork
        self._v = memoryview(self._mem).cast("i")
        self._alive_at: dict[int, tuple[float, bool]] = {}

    # -- the master ---------------------------------------------------------------------------------
    def claim(self) -> int:
        """A free row for a worker about to be forked (rows of dead workers are reused)."""
        for row in range(1, self.rows + 1):
            pid, state = self._v[row * _FIELDS], self._v[row * _FIELDS + 1]
            if state == FREE or (pid > 0 and not pid_alive(pid)):
                base = row * _FIELDS
                self._v[base], self._v[base + 1], self._v[base + 2] = 0, BOOTING, 0
                self._v[0] = max(self._v[0], row)
                return row
        raise RuntimeError(f"more than {self.rows} gunicorn workers: no row left in the board")

    # -- a worker, in its own row -------------------------------------------------------------------
    def set(self, row: int, state: int, conns: int | None = None) -> None:
        base = row * _FIELDS
        self._v[base] = os.getpid()
        self._v[base + 1] = state
        if conns is not None:
            self._v[base + 2] = conns

    def set_conns(self, row: int, conns: int) -> None:
        self._v[row * _FIELDS + 2] = conns

    # -- anyone ---------------------------------------------------------------------------------------
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
