"""Where an embedding run spends its time: seconds per stage, GPU work timed with CUDA events (a wall-clock span
around asynchronous kernels would time their launches), and the GPU's utilisation sampled through NVML."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class StageTimer:
    """Seconds per named stage; thread-safe for ``add``, spans on the calling thread's stream."""

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._seconds: dict[str, float] = defaultdict(float)
        self._events: dict[str, list] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self._lock:
            self._seconds[name] += seconds

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            with self._lock:
                self._events[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.add(name, time.perf_counter() - t0)

    def totals(self) -> dict[str, float]:
        """Seconds per stage (waits for the recorded GPU work to finish)."""
        with self._lock:
            events = {name: list(pairs) for name, pairs in self._events.items()}
            out = dict(self._seconds)
        for name, pairs in events.items():
            pairs[-1][1].synchronize()
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000.0
        return out


class UtilisationSampler:
    """Mean GPU utilisation (%) over a block, sampled every 0.2 s; None where it cannot be read (no NVML)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpu-utilisation")

    def __enter__(self) -> UtilisationSampler:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            with contextlib.suppress(Exception):  # no NVML (pynvml) here, or the driver refuses
                self.samples.append(int(torch.cuda.utilization(self.device)))

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None
