"""Client threads against a running service, for tests and benchmarks (development only)."""

from __future__ import annotations

import http.client
import random
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


class Lookups(ClientThreads):
    """Lookups of random appids on n keep-alive connections; ``answered`` and ``failures`` (statuses other
    than 200, and errors: a reset or closed connection is a lost request).

    ``pause`` between two requests of a thread leaves the machine room for what runs meanwhile (the
    master's torch import at a low priority): every request is still checked, the refresh just ends sooner.
    """

    def __init__(self, host: str, port: int, appids: list[int], n: int = 2, pause: float = 0.005) -> None:
        super().__init__(n)
        self.host, self.port, self.appids, self.pause = host, port, appids, pause
        self.answered, self.failures = 0, []

    def _run(self, i: int) -> None:
        rng = random.Random(i)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        while not self._stop.wait(self.pause):
            try:
                conn.request("GET", f"/match/{rng.choice(self.appids)}?k=10")
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    self.answered += 1
                else:
                    self.failures.append(r.status)
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(repr(e))
                conn.close()
        conn.close()
