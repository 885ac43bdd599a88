"""Running a complete request on the app: light ones inline in the event loop, heavy ones in a small pool.

gunicorn's parser makes the WSGI environ, and the app's ``is_heavy(environ)`` says where it runs, on the path
as the app will route it. Light requests (lookups, pages) run inline, as in a sync worker: no hand-off, no
contention for the GIL. Heavy ones (model passes) run in a few lower-priority threads, so that lookups keep
the cores; beyond those they wait in a short queue under a deadline, and beyond it get 503 with Retry-After.
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime

from gunicorn.http import RequestParser, wsgi
from gunicorn.http import errors as http_errors

from .http1 import RequestError, error_response

Answer = tuple[list[bytes], bool]  # the response's bytes, and whether the connection stays open


@dataclass
class Limits:
    """What the app tells the worker through ``app.config["SERVING"]`` (a dict with these keys)."""

    header_timeout: float = 10.0  # from a request's first byte to the end of its headers
    body_timeout: float = 30.0  # from the end of the headers to the end of the body
    write_timeout: float = 30.0  # for a response to be taken by the client
    max_body_bytes: int = 8 * 2**20
    max_buffered_bytes: int = 64 * 2**20  # bodies held at once (received, waiting, running), per worker
    heavy_slots: int = 1  # heavy requests run at once, per worker
    heavy_queue: int = 8  # heavy requests waiting for a slot, per worker
    queue_timeout: float = 10.0  # how long one may wait
    heavy_nice: int = 10  # CPU priority of the heavy threads, relative to the loop
    is_heavy: Callable[[dict], bool] = lambda environ: environ["REQUEST_METHOD"] not in ("GET", "HEAD", "OPTIONS")

    @classmethod
    def of(cls, app) -> Limits:
        given = dict(getattr(app, "config", {}).get("SERVING") or {})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in known})


def busy_answer() -> bytes:
    return error_response(503, "busy", "too many image searches at once; try again in a moment", retry_after=1)


class _Out:
    """The socket gunicorn's Response writes to: it collects the response, which the loop sends later."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def sendall(self, data) -> None:
        self.parts.append(bytes(data))

    def send(self, data) -> int:  # the interim 100 Continue: the loop sent it when the headers came
        return len(data)


# gunicorn's parse errors, as the API answers them (the rest: 400 bad_request)
_PARSE_ERRORS = {
    "LimitRequestLine": (414, "uri_too_long"),
    "LimitRequestHeaders": (431, "headers_too_large"),
    "UnsupportedTransferCoding": (501, "unsupported_transfer_coding"),
    "ExpectationFailed": (417, "expectation_failed"),
    "InvalidChunkSize": (400, "bad_chunk_size"),
    "ForbiddenProxyRequest": (403, "forbidden"),
}


def refusal(e: Exception) -> bytes:
    """The answer to a request the parser refused: its status and code, in the API's JSON."""
    if isinstance(e, RequestError):
        return error_response(e.status, e.code, e.message)
    if isinstance(e, (StopIteration, http_errors.NoMoreData)):
        return error_response(400, "bad_request", "incomplete request")
    status, code = _PARSE_ERRORS.get(type(e).__name__, (400, "bad_request"))
    return error_response(status, code, f"{type(e).__name__}: {e}"[:300])


class AppCall:
    """One complete request, its head parsed by gunicorn into the app's environ; ``run()`` answers it.

    ``worker``: the gunicorn worker (its cfg, log, wsgi app, request count and ``workers_ready``).
    """

    def __init__(self, worker, raw: bytes, addr, server) -> None:
        self.worker = worker
        self.parser = RequestParser(worker.cfg, [raw], addr)
        self.req = next(self.parser)
        self.out = _Out()
        self.resp, self.environ = wsgi.create(self.req, self.out, addr, server, worker.cfg)

    @classmethod
    def open(cls, worker, raw: bytes, addr, server) -> AppCall | bytes:
        """The call, or the error response for a request gunicorn's parser refuses (in the API's JSON)."""
        try:
            return cls(worker, raw, addr, server)
        except Exception as e:
            worker.log.warning("Invalid request from ip=%s: %r", client_ip(addr), e)
            return refusal(e)

    def run(self) -> Answer:
        """Read the body from memory, run the app, and collect its response."""
        worker, req, resp, environ = self.worker, self.req, self.resp, self.environ
        started = datetime.now()
        try:
            body = req.body.read()
            if self.parser.unreader.read():
                raise RequestError(400, "bad_framing", "the request's framing is ambiguous")
        except Exception as e:
            return [refusal(e)], False
        environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)), "wsgi.multithread": True})
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["serving.ready"] = worker.workers_ready
        worker.count_request()
        if not worker.alive:
            resp.force_close()
        try:
            worker.cfg.pre_request(worker, req)
            result = worker.wsgi(environ, resp.start_response)
            try:
                for item in result:
                    resp.write(item)
                resp.close()
            finally:
                if hasattr(result, "close"):
                    result.close()
        except Exception:
            worker.log.exception("Error handling request %s %s", req.method, req.uri)
            return [error_response(500, "internal_error", "an unexpected error occurred; it has been logged")], False
        worker.log.access(resp, req, environ, datetime.now() - started)
        worker.cfg.post_request(worker, req, environ, resp)
        return self.out.parts, not resp.should_close()


class HeavyPool:
    """The heavy requests' threads, their queue and its deadline; jobs are keyed by their connection, and a
    thread calls ``wake()`` when its job is done, so that the loop collects the answer."""

    def __init__(self, limits: Limits, wake: Callable[[], None], log) -> None:
        self.limits, self.wake, self.log = limits, wake, log
        self.running = 0
        self.waiting: deque[tuple[Hashable, Callable[[], Answer], float]] = deque()
        self.finished: deque[tuple[Hashable, Future]] = deque()
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, limits.heavy_slots), thread_name_prefix="heavy", initializer=self._lower_priority
        )

    def _lower_priority(self) -> None:
        """Heavy threads yield the CPU to the loop (Linux: a thread's nice value is its own)."""
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.limits.heavy_nice))
        except (AttributeError, OSError) as e:
            self.log.info("heavy threads keep the normal priority: %s", e)

    def submit(self, key: Hashable, job: Callable[[], Answer]) -> bool:
        """Run ``job`` now or queue it; False when there is neither a slot nor room in the queue."""
        if self.running < self.limits.heavy_slots:
            self._start(key, job)
        elif len(self.waiting) < self.limits.heavy_queue:
            self.waiting.append((key, job, time.monotonic() + self.limits.queue_timeout))
        else:
            return False
        return True

    def _start(self, key: Hashable, job: Callable[[], Answer]) -> None:
        self.running += 1

        def done(future: Future) -> None:  # in the heavy thread: hand back to the loop
            self.finished.append((key, future))
            self.wake()

        self.pool.submit(job).add_done_callback(done)

    def answers(self) -> list[tuple[Hashable, Answer]]:
        """The answers of the jobs done since the last call; queued jobs take the freed slots."""
        out = []
        while self.finished:
            key, future = self.finished.popleft()
            self.running -= 1
            try:
                out.append((key, future.result()))
            except Exception:  # AppCall.run answers the app's errors itself: this is the worker's own fault
                self.log.exception("heavy request failed")
                out.append((key, ([error_response(500, "internal_error", "an unexpected error occurred")], False)))
        while self.waiting and self.running < self.limits.heavy_slots:
            key, job, _ = self.waiting.popleft()
            self._start(key, job)
        return out

    def expired(self, now: float) -> list[Hashable]:
        """The keys of the queued jobs that waited past their deadline (dropped from the queue)."""
        out = []
        while self.waiting and self.waiting[0][2] < now:
            out.append(self.waiting.popleft()[0])
        return out

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def client_ip(addr) -> str:
    return addr[0] if isinstance(addr, tuple) else str(addr)
