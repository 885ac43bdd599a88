"""Client threads against a running service, for tests and benchmarks (development only)."""

from __future__ import annotations

import threading


class ClientThreads:
    """Client threads, each running ``_run(i)`` until ``_stop`` is set: started and stopped with the block."""

    def __init__(self, n: int) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """A Server-Timing header's durations in ms, by name."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out
