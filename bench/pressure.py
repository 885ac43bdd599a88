"""Background pressure for bench/serve.py: slow clients and uploaders, each a context manager (bounded, 127.0.0.1).

``SlowClients(host, port, n)``: n connections that each send one byte of a request a second, half in
the headers, half in a body (Content-Length 100,000): the "slowloris" pattern.
``Uploaders(host, port, n, body)``: n threads posting an image back to back (POST /match?strategy=
SimpleS16), each waiting only when answered 503, for its Retry-After. Both stop when the block ends;
``counts`` says how they were answered.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections import Counter


class SlowClients:
    def __init__(self, host: str, port: int, n: int, interval: float = 1.0) -> None:
        self.host, self.port, self.n, self.interval = host, port, n, interval
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> tuple[socket.socket, bytes]:
        s = socket.create_connection((self.host, self.port), timeout=5)
        s.setblocking(False)
        if i % 2:  # slow body: complete headers, then one byte at a time
            s.send(b"POST /match HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
            return s, b"\xff"
        s.send(b"GET /match/10 HTTP/1.1\r\n")  # slow headers: one more byte of a header line at a time
        return s, b"X"

    def _run(self) -> None:
        conns = {}
        for i in range(self.n):
            with contextlib.suppress(OSError):
                conns[i] = self._open(i)
        while not self._stop.wait(self.interval):
            for i, (s, byte) in list(conns.items()):
                try:
                    s.send(byte)
                except BlockingIOError:
                    pass
                except OSError:  # answered (408) and closed: reconnect, the pressure stays
                    self.counts["reconnected"] += 1
                    s.close()
                    with contextlib.suppress(OSError):
                        conns[i] = self._open(i)
        for s, _ in conns.values():
            s.close()

    def __enter__(self) -> SlowClients:
        self._thread.start()
        time.sleep(min(2.0, 2 * self.interval))  # all connected, some bytes sent
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Uploaders:
    def __init__(self, host: str, port: int, n: int, body: bytes, strategy: str = "SimpleS16") -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]
        self.host, self.port, self.body, self.strategy = host, port, body, strategy
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        headers = {"Content-Type": "image/jpeg"}
        while not self._stop.is_set():
            try:
                conn.request("POST", f"/match?strategy={self.strategy}&k=10", body=self.body, headers=headers)
                r = conn.getresponse()
                r.read()
                status, retry = str(r.status), r.getheader("Retry-After")
            except (OSError, http.client.HTTPException):
                status, retry = "error", "1"
                conn.close()
            with self._lock:
                self.counts[status] += 1
            if retry:
                self._stop.wait(float(retry))
        conn.close()

    def __enter__(self) -> Uploaders:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=90)
