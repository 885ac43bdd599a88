"""Running a complete request on the app: light ones inline in the event loop, heavy ones in a small pool.

gunicorn's parser makes the WSGI environ, and the app's ``is_heavy(environ)`` says where it runs. Light requests
(lookups, pages) run inline, as in a sync worker; heavy ones (model passes) run in a few lower-priority threads,
wait beyond those in a short queue under a deadline, and beyond it get 503 with Retry-After.
"""

from __future__ import annotations

import io
import os
import threading
import time
import types
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from gunicorn.http import RequestParser, wsgi
from gunicorn.http import errors as http_errors

from .http1 import RequestError, error_response

Answer = tuple[list[bytes], bool]  # the response's bytes, and whether the connection stays open
HEAVY_NICE = 10  # CPU priority of the heavy threads, relative to the loop


@dataclass
class Limits:
    """What the app tells the worker in ``app.config["SERVING"]`` (app/__init__.py), in seconds and bytes."""

    header_timeout: float  # from a request's first byte to the end of its headers
    body_timeout: float  # from the end of the headers to the end of the body
    max_body_bytes: int
    max_buffered_bytes: int  # bodies held at once (received, waiting, running), per worker
    heavy_slots: int  # heavy requests run at once, per worker
    heavy_queue: int  # heavy requests waiting for a slot, per worker
    queue_timeout: float  # how long one may wait
    is_heavy: Callable[[dict], bool]  # whether a request (its environ) runs a model pass


def busy_answer(page: bool = False) -> bytes:
    message = "too many image searches at once; try again in a moment"
    return error_response(503, "busy", message, retry_after=1, page=page)


# gunicorn's parse errors, as the API answers them (the rest: 400 bad_request)
_PARSE_ERRORS = {
    "LimitRequestLine": (414, "uri_too_long"),
    "LimitRequestHeaders": (431, "headers_too_large"),
    "UnsupportedTransferCoding": (501, "unsupported_transfer_coding"),
    "ExpectationFailed": (417, "expectation_failed"),
    "InvalidChunkSize": (400, "bad_chunk_size"),
    "ForbiddenProxyRequest": (403, "forbidden"),
}


def refusal(e: Exception, page: bool = False) -> bytes:
    """The answer to a request the parser refused: its status and code, in the API's JSON (``page``: as HTML)."""
    if isinstance(e, RequestError):
        return error_response(e.status, e.code, e.message, e.retry_after, page)
    if isinstance(e, (StopIteration, http_errors.NoMoreData)):
        return error_response(400, "bad_request", "incomplete request")
    status, code = _PARSE_ERRORS.get(type(e).__name__, (400, "bad_request"))
    return error_response(status, code, f"{type(e).__name__}: {e}"[:300])


class AppCall:
    """One complete request, parsed by gunicorn into the app's environ; ``run()`` answers it on ``worker``."""

    def __init__(self, worker, raw: bytes, addr, server) -> None:
        self.worker = worker
        self.parser = RequestParser(worker.cfg, [raw], addr)
        self.req = next(self.parser)
        self.parts: list[bytes] = []
        # what gunicorn's Response writes to: the loop sends the parts later (and sent any 100 Continue itself)
        out = types.SimpleNamespace(sendall=self.parts.append, send=len)
        self.resp, self.environ = wsgi.create(self.req, out, addr, server, worker.cfg)

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
        worker.nr += 1
        if worker.nr >= worker.max_requests and worker.alive:  # gunicorn's max_requests: the worker is replaced
            worker.log.info("Autorestarting worker after current request.")
            worker.alive = False
        try:
            worker.cfg.pre_request(worker, req)
            result = worker.wsgi(environ, resp.start_response)
            # a stopping worker, also one told to stop while the app ran (a model pass takes seconds): the client
            # reconnects elsewhere for its next request
            if not worker.alive:
                resp.force_close()
            try:
                for item in result:
                    resp.write(item)
                resp.close()
            finally:
                if hasattr(result, "close"):
                    result.close()
            worker.log.access(resp, req, environ, datetime.now() - started)
        except Exception:
            worker.log.exception("Error handling request %s %s", req.method, req.uri)
            return [error_response(500, "internal_error", "an unexpected error occurred; it has been logged")], False
        finally:
            try:  # as gunicorn's own workers: after every request, and a failing hook fails nothing else
                worker.cfg.post_request(worker, req, environ, resp)
            except Exception:
                worker.log.exception("Exception in post_request hook")
        return self.parts, not resp.should_close()


class HeavyPool:
    """The heavy requests' threads and queue, jobs keyed by their connection; a thread calls ``wake()`` when its
    job is done, so that the loop collects the answer."""

    def __init__(self, limits: Limits, wake: Callable[[], None], log) -> None:
        self.limits, self.wake, self.log = limits, wake, log
        self.jobs: dict[Hashable, tuple[float, Future]] = {}  # running, queued or done: (queue deadline, future)
        self.pool = ThreadPoolExecutor(limits.heavy_slots, thread_name_prefix="heavy", initializer=self._nice)

    def _nice(self) -> None:
        """Heavy threads yield the CPU to the loop (Linux: a thread's nice value is its own)."""
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + HEAVY_NICE))
        except (AttributeError, OSError) as e:
            self.log.info("heavy threads keep the normal priority: %s", e)

    def submit(self, key: Hashable, job: Callable[[], Answer]) -> bool:
        """Run ``job`` now or queue it; False when there is neither a slot nor room in the queue."""
        if len(self.jobs) >= self.limits.heavy_slots + self.limits.heavy_queue:
            return False
        future = self.pool.submit(job)
        future.add_done_callback(lambda _: self.wake())  # in the heavy thread: the loop collects the answer
        self.jobs[key] = (time.monotonic() + self.limits.queue_timeout, future)
        return True

    def answers(self) -> list[tuple[Hashable, Answer]]:
        """The answers of the jobs done since the last call."""
        out = []
        for key in [key for key, (_, future) in self.jobs.items() if future.done()]:
            future = self.jobs.pop(key)[1]
            try:
                out.append((key, future.result()))
            except Exception:  # AppCall.run answers the app's errors itself: this is the worker's own fault
                self.log.exception("heavy request failed")
                out.append((key, ([error_response(500, "internal_error", "an unexpected error occurred")], False)))
        return out

    def expired(self, now: float) -> list[Hashable]:
        """The keys of the queued jobs that waited past their deadline (cancelled, so never run)."""
        out = [key for key, (deadline, future) in self.jobs.items() if deadline < now and future.cancel()]
        for key in out:
            del self.jobs[key]
        return out

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def client_ip(addr) -> str:
    return addr[0] if isinstance(addr, tuple) else str(addr)
