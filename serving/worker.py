"""A gunicorn worker that reads whole requests before the app sees them, and balances its connections.

One event loop per process (the main thread) accepts connections and reads requests without
blocking: the headers under a total deadline, then the body (Content-Length bytes or a chunked body,
framing checked as it arrives) under another, with the size cap applied before a byte of an
oversized body is read. A slow client costs a few bytes of buffer, never a thread. Only a complete
request is parsed (gunicorn's parser, from memory) and run:

- light requests (lookups, pages) inline in the loop, one after the other, as a sync worker would:
  no thread hand-off, no contention for the GIL, so no latency added by the server;
- heavy ones (model passes: uploads, CDN fallbacks; the app says which) in a small thread pool
  ("heavy slots") whose threads run at a lower CPU priority, so lookups keep the cores. Beyond the
  slots, requests wait in a short queue with a deadline; beyond the queue, or past the deadline, 503
  with Retry-After. Their bodies are already in memory: a waiting upload holds no thread either.

Responses are assembled in memory and written by the loop as the socket accepts them, so a slow
reader holds no thread. Errors the worker answers itself (bad framing, bad chunk size, too large, too
slow, busy, malformed request line) use the API's JSON shape.

Connections are balanced between the workers through ``serving.board``: a worker accepts new
connections only while it holds no more than any other serving worker, and a worker holding more
than its share closes surplus keep-alive connections after their next response ("Connection:
close"), so the clients reconnect to the others. The first connections after a start or a worker
restart thus spread out within a request each. ``/health`` reads the same board (``serving.ready``
in the WSGI environ) and says "starting" until every configured worker serves.

The app passes its limits in ``app.config["SERVING"]`` (see ``Limits``); an app without it gets
the defaults. Use: ``worker_class = "serving.worker.BufferedWorker"`` in gunicorn.conf.py.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import io
import logging
import math
import os
import select
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from datetime import datetime

from gunicorn.http import RequestParser, wsgi
from gunicorn.http import errors as http_errors
from gunicorn.workers import base

from .board import FREE, READY, STOPPING, TORCH_SHARED, Board
from .http1 import MAX_HEAD_BYTES, ChunkScanner, RequestError, error_response, head_framing

TICK = 0.25  # seconds between deadline sweeps and heartbeats
SWITCH_INTERVAL = 0.001  # sys.setswitchinterval in the workers
ACCEPT_RECHECK = 0.002  # a worker over its share looks again at a pending connection after this long
ACCEPT_GRACE = 0.02  # and takes it anyway once it has waited this long (the others are busy or stuck)
LAME_DUCK_SECONDS = 1.0  # a stopping worker's idle keep-alive connections may still send one request
LINGER_SECONDS = 5.0  # after a final answer, how long to read and drop what the client still sends
LINGER_BYTES = 256 * 2**20
IDLE, HEAD, BODY, BUSY, WRITE, LINGER = range(6)
PHASE_NAMES = ("idle", "headers", "body", "busy", "write", "linger")


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
    is_heavy: Callable[[str, str], bool] | None = None  # (method, path) -> runs in the heavy pool?

    @classmethod
    def of(cls, app) -> Limits:
        given = dict(getattr(app, "config", {}).get("SERVING") or {})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in given.items() if k in known})

    def heavy(self, method: str, path: str) -> bool:
        if self.is_heavy is not None:
            return self.is_heavy(method, path)
        return method not in ("GET", "HEAD", "OPTIONS")


class Conn:
    __slots__ = ("addr", "buf", "deadline", "events", "framing", "head_end", "keep", "out", "phase", "scanner")
    __slots__ += ("server", "shed", "sock", "drained", "held")

    def __init__(self, sock: socket.socket, addr, server, deadline: float) -> None:
        self.sock, self.addr, self.server = sock, addr, server
        self.buf = bytearray()
        self.phase, self.deadline, self.events = IDLE, deadline, 0
        self.framing = self.scanner = None
        self.head_end = -1
        self.out = memoryview(b"")
        self.keep = self.shed = False
        self.drained = 0
        self.held = 0  # body bytes this connection counts against the worker's budget


class _Out:
    """The socket gunicorn's Response writes to: collects the response, sent later by the loop."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def sendall(self, data) -> None:
        self.parts.append(bytes(data))

    def send(self, data) -> int:  # interim answers (100 Continue): the loop sent them when the headers came
        return len(data)

    def sendfile(self, file, offset: int = 0, count: int | None = None) -> None:
        file.seek(offset)
        self.parts.append(file.read(count) if count is not None else file.read())

    def settimeout(self, _t) -> None:
        pass

    def gettimeout(self) -> None:
        return None

    def setblocking(self, _flag) -> None:
        pass

    def shutdown(self, _how) -> None:  # the body is read already: nothing is left to stop reading
        pass


# gunicorn's parse errors, as the API answers them (the rest: 400 bad_request)
_PARSE_ERRORS = {
    "LimitRequestLine": (414, "uri_too_long"),
    "LimitRequestHeaders": (431, "headers_too_large"),
    "UnsupportedTransferCoding": (501, "unsupported_transfer_coding"),
    "ExpectationFailed": (417, "expectation_failed"),
    "InvalidChunkSize": (400, "bad_chunk_size"),
    "ForbiddenProxyRequest": (403, "forbidden"),
}


class BufferedWorker(base.Worker):
    _board: Board | None = None  # made in the master, before the first fork; shared by all workers

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # in the master, before fork
        self.board = self.shared_board()
        self.row = self.board.claim()
        self.torch_shared = "torch" in sys.modules  # imported by the master already (serving/refresh.py)

    @classmethod
    def shared_board(cls) -> Board:
        """The workers' board, made in the master the first time it is needed (before the first fork)."""
        if BufferedWorker._board is None:
            BufferedWorker._board = Board()
        return BufferedWorker._board

    # -- start and main loop -------------------------------------------------------------------------
    def init_process(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.nconns = self.shedding = self.heavy_busy = 0
        self.held = 0  # body bytes held in memory by all connections (max_buffered_bytes)
        self.finished: deque[tuple[Conn, Future]] = deque()
        self.waiting: deque[tuple[Conn, bytes, float]] = deque()
        self.accepting = False
        self.resume_accept_at = 0.0  # when a worker that left a connection to the others looks again
        self.pending_since: float | None = None  # since when it has seen a connection nobody took
        super().init_process()  # loads the app, runs post_worker_init, then run()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.limits = Limits.of(self.wsgi)
        # A heavy thread waiting for the GIL gets it after this long instead of 5 ms (and a lookup waits at
        # most this long behind a heavy thread's Python): model passes progress beside a busy loop.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, self.limits.heavy_slots), thread_name_prefix="heavy", initializer=self._lower_priority
        )

    def _lower_priority(self) -> None:
        """Heavy threads yield the CPU to the loop (Linux: a thread's nice value is its own)."""
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.limits.heavy_nice))
        except (AttributeError, OSError) as e:
            self.log.info("heavy threads keep the normal priority: %s", e)

    def run(self) -> None:
        self.sel.register(self.PIPE[0], selectors.EVENT_READ, self._on_wakeup)
        for listener in self.sockets:
            listener.setblocking(False)
        self.board.set_flags(self.row, TORCH_SHARED if self.torch_shared else 0)
        self.board.set(self.row, READY, 0)
        next_tick = 0.0
        while self.alive:
            next_tick = self._loop_once(next_tick)
        self._drain_and_stop()

    def _loop_once(self, next_tick: float) -> float:
        timeout = self._balance()
        try:
            events = self.sel.select(timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            key.data(key.fileobj, mask)
        self._finish_heavy()
        now = time.monotonic()
        if now >= next_tick:
            self._tick(now)
            next_tick = now + TICK
        return next_tick

    def _tick(self, now: float) -> None:
        self.notify()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            self.alive = False
        for conn in [c for c in self.conns.values() if c.phase != BUSY and c.deadline < now]:
            self._expired(conn)
        while self.waiting and self.waiting[0][2] < now:
            conn, _, _ = self.waiting.popleft()
            self._respond(conn, [self._busy_answer()], False)

    def _drain_and_stop(self) -> None:
        """Graceful stop: no new connections; requests under way finish (graceful_timeout at most).

        An idle keep-alive connection has LAME_DUCK_SECONDS to send one more request, answered with
        ``Connection: close``, and a connection closed after its answer lingers as long: closing either at
        once would race with a request or an answer already on its way, which the client would see as a
        reset. So a restart under load (the workers' refresh once the master has imported torch,
        serving/refresh.py) loses no request.
        """
        self._set_accepting(False)
        self.board.set(self.row, STOPPING)
        now = time.monotonic()
        deadline, lame_until = now + self.cfg.graceful_timeout, now + LAME_DUCK_SECONDS
        next_tick = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= lame_until:  # lingering ones too: their client has had the answer's FIN
                for conn in [c for c in self.conns.values() if c.phase in (IDLE, LINGER)]:
                    self._close(conn)
            if not self.conns:
                break
            next_tick = self._loop_once(next_tick)
        for conn in list(self.conns.values()):
            self._close(conn)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.board.set(self.row, FREE, 0)
        atexit.register(_exit_now)  # runs first at exit: gunicorn's own exit steps are done by then

    def _on_wakeup(self, fileobj, _mask) -> None:
        try:
            while os.read(self.PIPE[0], 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # -- connections and balance ---------------------------------------------------------------------
    def _fair_to_accept(self) -> bool:
        """No other serving worker holds fewer connections than this one."""
        fewest = self.board.fewest_connections_elsewhere(self.row)
        return fewest is None or self.nconns <= fewest

    def _balance(self) -> float:
        """Watch the listening sockets unless stopping, full, or leaving a connection to the others for a
        moment; returns how long the loop may wait for events."""
        now = time.monotonic()
        able = self.alive and self.nconns < self.cfg.worker_connections
        if not able:
            self._set_accepting(False)
            return TICK
        if not self.accepting and now >= self.resume_accept_at:
            if self.pending_since is not None and not _readable(self.sockets):
                self.pending_since = None  # another worker took it
            self._set_accepting(True)
        return TICK if self.accepting else max(0.0, min(TICK, self.resume_accept_at - now))

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        for listener in self.sockets:
            if on:
                self.sel.register(listener, selectors.EVENT_READ, self._on_accept)
            else:
                self.sel.unregister(listener)
        self.accepting = on

    def _on_accept(self, listener, _mask) -> None:
        """Take one connection, if this worker's turn: every worker watches the listening sockets, and
        one holding more connections than another leaves a new one to the others, unless nobody has
        taken it after ACCEPT_GRACE. One per event: the balance is re-checked before the next."""
        now = time.monotonic()
        if not self._fair_to_accept():
            self.pending_since = self.pending_since or now
            if now - self.pending_since < ACCEPT_GRACE:
                self._set_accepting(False)
                self.resume_accept_at = now + ACCEPT_RECHECK
                return
        self.pending_since = None
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, addr, listener.getsockname(), time.monotonic() + self.cfg.keepalive)
        self.conns[sock.fileno()] = conn
        self.nconns += 1
        self.board.set_conns(self.row, self.nconns)
        self._watch(conn, selectors.EVENT_READ)

    def _surplus(self) -> bool:
        """Does this worker hold more than its share of the serving workers' connections?"""
        ready = self.board.ready()
        if len(ready) < 2:
            return False
        share = math.ceil(sum(c for _, _, c in ready) / len(ready))
        return self.nconns - self.shedding > share

    def _watch(self, conn: Conn, events: int) -> None:
        if events == conn.events:
            return
        if conn.events == 0:
            self.sel.register(conn.sock, events, self._on_io)
        elif events == 0:
            self.sel.unregister(conn.sock)
        else:
            self.sel.modify(conn.sock, events, self._on_io)
        conn.events = events

    def _close(self, conn: Conn) -> None:
        self._watch(conn, 0)
        self.conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(OSError):
            conn.sock.close()
        self.nconns -= 1
        self.shedding -= conn.shed
        self._hold(conn, 0)
        self.board.set_conns(self.row, self.nconns)

    def _expired(self, conn: Conn) -> None:
        if conn.phase == HEAD:
            message = f"the request headers took longer than {self.limits.header_timeout:g} s"
            self._respond(conn, [error_response(408, "request_timeout", message)], False)
        elif conn.phase == BODY:
            message = f"the upload took longer than {self.limits.body_timeout:g} s; try again"
            self._respond(conn, [error_response(408, "upload_timeout", message)], False)
        else:  # idle keep-alive, a reader that stopped reading, the end of a linger
            self._close(conn)

    # -- reading ---------------------------------------------------------------------------------------
    def _on_io(self, sock, mask) -> None:
        conn = self.conns.get(sock.fileno())
        if conn is None:
            return
        if mask & selectors.EVENT_WRITE and conn.phase == WRITE:
            self._flush(conn)
        elif mask & selectors.EVENT_READ:
            self._on_readable(conn)

    def _on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.phase in (HEAD, BODY):
                self.log.info(
                    "client %s closed the connection in the middle of a request (%s, %d bytes received)",
                    _ip(conn),
                    PHASE_NAMES[conn.phase],
                    len(conn.buf),
                )
            self._close(conn)
            return
        if conn.phase == LINGER:
            conn.drained += len(data)
            if conn.drained > LINGER_BYTES:
                self._close(conn)
            return
        conn.buf += data
        if conn.phase == IDLE:
            conn.phase = HEAD
            conn.deadline = time.monotonic() + self.limits.header_timeout
        self._advance(conn)

    def _advance(self, conn: Conn) -> None:
        """Dispatch the request at the front of the buffer if it is complete; refuse bad framing."""
        try:
            end = self._frame(conn)
        except RequestError as e:
            self.log.info("refused a request from %s: %d %s", _ip(conn), e.status, e.message)
            self._respond(conn, [error_response(e.status, e.code, e.message, e.retry_after)], False)
            return
        if end is None:
            return
        raw = bytes(conn.buf[:end])
        del conn.buf[:end]
        conn.head_end, conn.framing, conn.scanner = -1, None, None
        self._dispatch(conn, raw)

    def _frame(self, conn: Conn) -> int | None:
        if conn.head_end < 0:
            while conn.buf.startswith(b"\r\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
                del conn.buf[:2]
            end = conn.buf.find(b"\r\n\r\n")
            if end > MAX_HEAD_BYTES or (end < 0 and len(conn.buf) > MAX_HEAD_BYTES):
                raise RequestError(431, "headers_too_large", f"the headers are larger than {MAX_HEAD_BYTES} bytes")
            if end < 0:
                return None
            conn.head_end = end + 4
            conn.framing = framing = head_framing(bytes(conn.buf[:end]))
            if framing.length > self.limits.max_body_bytes:
                mb = self.limits.max_body_bytes / 2**20
                raise RequestError(413, "too_large", f"the upload is larger than the {mb:g} MB limit")
            if framing.chunked:
                conn.scanner = ChunkScanner(conn.head_end, self.limits.max_body_bytes)
            else:
                self._hold(conn, framing.length)  # all of it, before a byte is read
            if framing.chunked or framing.length:
                conn.phase = BODY
                conn.deadline = time.monotonic() + self.limits.body_timeout
                if framing.expect_continue and len(conn.buf) == conn.head_end:
                    _send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        if conn.scanner is not None:
            self._hold(conn, len(conn.buf) - conn.head_end)  # a chunked body: what has come so far
            return conn.scanner.scan(conn.buf)
        end = conn.head_end + conn.framing.length
        return end if len(conn.buf) >= end else None

    def _hold(self, conn: Conn, nbytes: int) -> None:
        """Count `nbytes` of body for this connection against the worker's budget, or refuse the request:
        bodies wait in memory (while received, queued, run), and many large ones at once would exhaust it."""
        total = self.held - conn.held + nbytes
        if nbytes > conn.held and total > self.limits.max_buffered_bytes:
            mb = self.limits.max_buffered_bytes / 2**20
            message = f"the server holds {mb:g} MB of uploads already; try again in a moment"
            raise RequestError(503, "busy", message, retry_after=1)
        self.held, conn.held = total, nbytes

    # -- running requests ------------------------------------------------------------------------------
    def _dispatch(self, conn: Conn, raw: bytes) -> None:
        conn.phase = BUSY
        self._watch(conn, 0)
        method, path = _method_and_path(raw)
        if not self.limits.heavy(method, path):
            parts, keep = self._serve(conn, raw)
            self._respond(conn, parts, keep)
        elif self.heavy_busy < self.limits.heavy_slots:
            self._start_heavy(conn, raw)
        elif len(self.waiting) < self.limits.heavy_queue:
            self.waiting.append((conn, raw, time.monotonic() + self.limits.queue_timeout))
        else:
            self._respond(conn, [self._busy_answer()], False)

    def _busy_answer(self) -> bytes:
        message = "too many image searches at once; try again in a moment"
        return error_response(503, "busy", message, retry_after=1)

    def _start_heavy(self, conn: Conn, raw: bytes) -> None:
        self.heavy_busy += 1
        future = self.pool.submit(self._serve, conn, raw)

        def done(f: Future, conn: Conn = conn) -> None:  # in the heavy thread: hand back to the loop
            self.finished.append((conn, f))
            _send_quietly(self.PIPE[1], b".")

        future.add_done_callback(done)

    def _finish_heavy(self) -> None:
        while self.finished:
            conn, future = self.finished.popleft()
            self.heavy_busy -= 1
            try:
                parts, keep = future.result()
            except Exception:  # _serve answers app errors itself; this is the worker's own fault
                self.log.exception("heavy request failed")
                parts, keep = [error_response(500, "internal_error", "an unexpected error occurred")], False
            self._respond(conn, parts, keep)
        while self.waiting and self.heavy_busy < self.limits.heavy_slots:
            conn, raw, _ = self.waiting.popleft()
            self._start_heavy(conn, raw)

    def _serve(self, conn: Conn, raw: bytes) -> tuple[list[bytes], bool]:
        """Parse one complete request from memory and run the app on it; the response and keep-alive."""
        parser = RequestParser(self.cfg, [raw], conn.addr)
        try:
            req = next(parser)
            body = req.body.read()
            if parser.unreader.read():
                raise RequestError(400, "bad_framing", "the request's framing is ambiguous")
        except RequestError as e:
            return [error_response(e.status, e.code, e.message)], False
        except (StopIteration, http_errors.NoMoreData):
            return [error_response(400, "bad_request", "incomplete request")], False
        except Exception as e:  # gunicorn's parse errors: answered in JSON, not its HTML page
            status, code = _PARSE_ERRORS.get(type(e).__name__, (400, "bad_request"))
            self.log.warning("Invalid request from ip=%s: %s", _ip(conn), e)
            return [error_response(status, code, f"{type(e).__name__}: {e}"[:300])], False
        return self._run_app(conn, req, body)

    def _run_app(self, conn: Conn, req, body: bytes) -> tuple[list[bytes], bool]:
        out = _Out()
        started = datetime.now()
        environ = {}
        try:
            resp, environ = wsgi.create(req, out, conn.addr, conn.server, self.cfg)
            environ.update({"wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body))})
            environ.pop("HTTP_TRANSFER_ENCODING", None)
            environ["wsgi.multithread"] = True
            environ["serving.ready"] = self.workers_ready
            environ["serving.sharing_torch"] = self.workers_sharing_torch
            self._count_request()
            if not self.alive:
                resp.force_close()
            elif threading.current_thread() is threading.main_thread() and self._surplus():
                conn.shed = True  # this connection goes; its client reconnects, to a less busy worker
                self.shedding += 1
                resp.force_close()
            result = self.wsgi(environ, resp.start_response)
            try:
                for item in result:
                    resp.write(item)
                resp.close()
            finally:
                if hasattr(result, "close"):
                    result.close()
        except Exception:
            self.log.exception("Error handling request %s %s", req.method, req.uri)
            return [error_response(500, "internal_error", "an unexpected error occurred; it has been logged")], False
        self.log.access(resp, req, environ, datetime.now() - started)
        return out.parts, not resp.should_close()

    def _count_request(self) -> None:
        self.nr += 1
        if self.nr >= self.max_requests and self.alive:
            self.log.info("Autorestarting worker after current request.")
            self.alive = False

    def workers_ready(self) -> tuple[int, int]:
        """(workers serving now, workers configured): the readiness that /health reports."""
        return len(self.board.ready()), self.cfg.workers

    def workers_sharing_torch(self) -> int:
        """Serving workers forked after the master imported torch (/health; serving/refresh.py)."""
        return len(self.board.sharing_torch())

    # -- writing ---------------------------------------------------------------------------------------
    def _respond(self, conn: Conn, parts: list[bytes], keep: bool) -> None:
        self._hold(conn, 0)  # the request's body is no longer needed
        conn.out = memoryview(b"".join(parts))
        conn.keep = keep  # what the answer told the client; a stopping worker's drain closes idle ones later
        conn.phase = WRITE
        conn.deadline = time.monotonic() + self.limits.write_timeout
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            self._watch(conn, selectors.EVENT_WRITE)
            return
        if not conn.keep:
            self._linger(conn)
            return
        conn.phase = IDLE
        conn.deadline = time.monotonic() + self.cfg.keepalive
        self._watch(conn, selectors.EVENT_READ)
        if conn.buf:  # the client sent its next request already (pipelining)
            conn.phase = HEAD
            conn.deadline = time.monotonic() + self.limits.header_timeout
            self._advance(conn)

    def _linger(self, conn: Conn) -> None:
        """Close after a final answer: FIN first, then drop what the client still sends for a while,
        so that it reads the answer instead of a reset (RFC 9112 section 9.6)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.buf = bytearray()
        conn.phase = LINGER
        conn.deadline = time.monotonic() + LINGER_SECONDS
        self._watch(conn, selectors.EVENT_READ)


def _method_and_path(raw: bytes) -> tuple[str, str]:
    line = raw[: raw.find(b"\r\n")]
    method, _, rest = line.partition(b" ")
    target = rest.split(b" ", 1)[0].split(b"?", 1)[0]
    return method.decode("latin-1"), target.decode("latin-1")


def _readable(sockets) -> bool:
    """Whether a connection is waiting on any listening socket (a zero-timeout poll)."""
    return bool(select.select(sockets, [], [], 0)[0])


def _ip(conn: Conn) -> str:
    return conn.addr[0] if isinstance(conn.addr, tuple) else str(conn.addr)


def _send_quietly(target, data: bytes) -> None:
    """A best-effort write (an interim 100 Continue, a wake-up byte): a full buffer or a gone peer is fine."""
    try:
        if isinstance(target, int):
            os.write(target, data)
        else:
            target.send(data)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
            raise


def _exit_now() -> None:
    """End a worker that stopped cleanly without the interpreter's teardown (torch's takes 5-15 s on 2
    busy cores, which every restart and every stop would wait for); logs and output are flushed first."""
    for handler in logging.getLogger().handlers + logging.getLogger("gunicorn.error").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
