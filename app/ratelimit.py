"""An optional per-client token bucket for the expensive endpoint (POST /match).

In-process: each gunicorn worker counts on its own, so with W workers a
client gets at most W times the configured rate; enough to keep one client
from monopolising the CPU, with no shared store to deploy. Memory is
bounded: the least recently seen clients are forgotten first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class RateLimiter:
    def __init__(self, count: int, period_s: float, max_clients: int = 10_000) -> None:
        self.capacity = float(count)
        self.refill_per_s = count / period_s
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, client: str, now: float | None = None) -> float | None:
        """Take one token; None if allowed, else the seconds to wait before the next one."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.refill_per_s)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[client] = (tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return None if allowed else (1.0 - tokens) / self.refill_per_s
