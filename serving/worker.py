"""The gunicorn worker: one event loop per process that reads whole requests under deadlines before the app
sees them, writes the answers as the sockets take them, and balances its connections with the other workers
(docs/serving.md). ``serving.dispatch`` runs each complete request.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import logging
import math
import os
import select
import selectors
import socket
import sys
import time
from collections import deque

from gunicorn.workers import base

from .board import BOOTING, FREE, READY, STOPPING, Board
from .dispatch import AppCall, HeavyPool, Limits, busy_answer, client_ip, refusal
from .http1 import MAX_HEAD_BYTES, ChunkScanner, RequestError, error_response, head_framing, is_upload_form

TICK = 0.25  # seconds between deadline sweeps and heartbeats
SWITCH_INTERVAL = 0.001  # sys.setswitchinterval in the workers
RECV_BYTES = 262144
ACCEPT_RECHECK = 0.002  # a worker over its share looks again at a pending connection after this long
ACCEPT_GRACE = 0.02  # and takes it anyway once it has waited this long (the others are busy or stuck)
ACCEPT_PAUSE = 0.1  # a worker out of descriptors (EMFILE) tries accept() again after this long
LAME_DUCK_SECONDS = 1.0  # a stopping worker's idle keep-alive connections may still send one request
LINGER_SECONDS = 5.0  # after a final answer, how long to read and drop what the client still sends
LINGER_BYTES = 256 * 2**20
WRITE_TIMEOUT = 30.0  # for an answer to be taken by the client
IDLE, HEAD, BODY, BUSY, WRITE, LINGER, CLOSED = range(7)


class Conn:
    """One client connection: what it sent that is not answered yet, and what is still to be written."""

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
        self.page = False  # the request at the front is the upload form's: a refusal is a page

    def enter(self, phase: int, seconds: float) -> None:
        """Move to ``phase``, which may last ``seconds``."""
        self.phase, self.deadline = phase, time.monotonic() + seconds


class BufferedWorker(base.Worker):
    board: Board | None = None  # made in the master, before the first fork; shared by all workers

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)  # in the master, before fork
        if BufferedWorker.board is None:
            BufferedWorker.board = Board()
        self.row = self.board.claim()

    # -- start and main loop -------------------------------------------------------------------------
    def init_process(self) -> None:
        # its pid in its row at once: a worker killed while it boots (OOM, gunicorn's timeout) frees its row
        self.board.set(self.row, BOOTING, 0)
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, Conn] = {}
        self.shedding = 0  # connections to close after their answer, for the balance
        self.held = 0  # body bytes held in memory by all connections (max_buffered_bytes)
        self.pipelined: deque[Conn] = deque()  # connections whose buffer holds their next request
        self.accepting = False
        self.resume_accept_at = 0.0  # when a worker that left a connection to the others looks again
        self.pending_since: float | None = None  # since when it has seen a connection nobody took
        self.next_tick = 0.0
        super().init_process()  # loads the app, runs post_worker_init, then run()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        self.limits = Limits(**self.wsgi.config["SERVING"])
        # A heavy thread waiting for the GIL gets it after this long instead of 5 ms (and a lookup waits at
        # most this long behind a heavy thread's Python): model passes progress beside a busy loop.
        sys.setswitchinterval(SWITCH_INTERVAL)
        self.heavy = HeavyPool(self.limits, lambda: _write_quietly(self.PIPE[1], b"."), self.log)
        # whether the app serves yet (False while it fetches its index, app/boot.py): READY on the board only then
        self.app_serves = self.wsgi.config.get("SERVES") or (lambda: True)
        self.marked_ready = False

    def run(self) -> None:
        self.sel.register(self.PIPE[0], selectors.EVENT_READ, self._on_wakeup)
        for listener in self.sockets:
            listener.setblocking(False)
        self._mark_ready()
        while self.alive:
            self._loop_once()
        self._drain_and_stop()

    def _mark_ready(self) -> None:
        """READY on the board (what /health counts) once the app serves, checked again every tick until then."""
        if not self.marked_ready and self.app_serves():
            self.board.set(self.row, READY, len(self.conns))
            self.marked_ready = True

    def _loop_once(self) -> None:
        timeout = self._balance()
        try:
            events = self.sel.select(0.0 if self.pipelined else timeout)
        except InterruptedError:
            events = []
        for key, mask in events:
            key.data(key.fileobj, mask)
        for conn, (parts, keep) in self.heavy.answers():
            self._respond(conn, parts, keep)
        for _ in range(len(self.pipelined)):  # each one's next request; any further one waits for the next turn
            conn = self.pipelined.popleft()
            if conn.phase == HEAD:
                self._advance(conn)
        self._tick(time.monotonic())

    def _tick(self, now: float) -> None:
        """Every TICK: the heartbeat, the parent's check and the deadlines."""
        if now < self.next_tick:
            return
        self.next_tick = now + TICK
        self.notify()
        self._mark_ready()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            self.alive = False
        for conn in [c for c in self.conns.values() if c.phase != BUSY and c.deadline < now]:
            self._expired(conn)
        for conn in self.heavy.expired(now):
            self._respond(conn, [busy_answer(conn.page)], False)

    def _drain_and_stop(self) -> None:
        """Graceful stop: no new connections; requests under way finish (graceful_timeout at most); idle
        keep-alive and lingering connections close after LAME_DUCK_SECONDS, so that none on its way meets a reset."""
        self._set_accepting(False)
        self.board.set(self.row, STOPPING, len(self.conns))
        now = time.monotonic()
        deadline, lame_until = now + self.cfg.graceful_timeout, now + LAME_DUCK_SECONDS
        while time.monotonic() < deadline:
            if time.monotonic() >= lame_until:  # lingering ones too: their client has had the answer's FIN
                for conn in [c for c in self.conns.values() if c.phase in (IDLE, LINGER)]:
                    self._close(conn)
            if not self.conns:
                break
            self._loop_once()
        for conn in list(self.conns.values()):
            self._close(conn)
        self.heavy.shutdown()
        self.board.set(self.row, FREE, 0)
        atexit.register(_exit_now)  # runs first at exit: gunicorn's own exit steps are done by then

    def _on_wakeup(self, fileobj, _mask) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self.PIPE[0], 4096)  # what is left wakes the next select

    def workers_ready(self) -> tuple[int, int]:
        """(workers serving now, workers configured): the readiness that /health reports."""
        return len(self.board.ready()), self.cfg.workers

    # -- connections and balance ---------------------------------------------------------------------
    def _balance(self) -> float:
        """Watch the listening sockets unless stopping, full, or leaving a connection to the others for a
        moment; returns how long the loop may wait."""
        now = time.monotonic()
        if not (self.alive and len(self.conns) < self.cfg.worker_connections):
            self._set_accepting(False)
            return TICK
        if not self.accepting and now >= self.resume_accept_at:
            if self.pending_since is not None and not select.select(self.sockets, [], [], 0)[0]:
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
        """Take one connection if it is this worker's turn: one holding more connections than another leaves it
        to the others, unless nobody took it within ACCEPT_GRACE. One per event: the balance is re-checked."""
        now = time.monotonic()
        fewest = self.board.fewest_connections_elsewhere(self.row)
        if fewest is not None and len(self.conns) > fewest:
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
        except OSError as e:  # out of descriptors or memory: the connection waits in the backlog a moment
            if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            self.log.warning("cannot accept a connection for now: %s", e)
            self._set_accepting(False)
            self.resume_accept_at = now + ACCEPT_PAUSE
            return
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock, addr, listener.getsockname(), time.monotonic() + self.cfg.keepalive)
        self.conns[sock.fileno()] = conn
        self.board.set_conns(self.row, len(self.conns))
        self._watch(conn, selectors.EVENT_READ)

    def _surplus(self) -> bool:
        """Does this worker hold more than its share of the serving workers' connections?"""
        ready = self.board.ready()
        if len(ready) < 2:
            return False
        share = math.ceil(sum(c for _, _, c in ready) / len(ready))
        return len(self.conns) - self.shedding > share

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
        if conn.phase == CLOSED:
            return
        self._watch(conn, 0)
        self.conns.pop(conn.sock.fileno(), None)
        with contextlib.suppress(OSError):
            conn.sock.close()
        conn.phase = CLOSED
        self.shedding -= conn.shed
        self._hold(conn, 0)
        self.board.set_conns(self.row, len(self.conns))

    def _expired(self, conn: Conn) -> None:
        if conn.phase == HEAD:
            message = f"the request headers took longer than {self.limits.header_timeout:g} s"
            self._respond(conn, [error_response(408, "request_timeout", message)], False)
        elif conn.phase == BODY:
            message = f"the upload took longer than {self.limits.body_timeout:g} s; try again"
            self._respond(conn, [error_response(408, "upload_timeout", message, page=conn.page)], False)
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
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if conn.phase in (HEAD, BODY):
                self.log.info(
                    "client %s closed the connection in the middle of a request (%s, %d bytes received)",
                    client_ip(conn.addr),
                    "headers" if conn.phase == HEAD else "body",
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
            conn.enter(HEAD, self.limits.header_timeout)
        self._advance(conn)

    def _advance(self, conn: Conn) -> None:
        """Dispatch the request at the front of the buffer if it is complete, else read on; refuse bad framing."""
        try:
            end = self._frame(conn)
        except RequestError as e:
            self.log.info("refused a request from %s: %d %s", client_ip(conn.addr), e.status, e.message)
            self._respond(conn, [refusal(e, conn.page)], False)
            return
        if end is None:
            self._watch(conn, selectors.EVENT_READ)
            return
        raw = bytes(conn.buf[:end])
        del conn.buf[:end]
        conn.head_end, conn.framing, conn.scanner = -1, None, None
        self._dispatch(conn, raw)

    def _frame(self, conn: Conn) -> int | None:
        """Where the request at the front of the buffer ends, once it is all there (None: not yet)."""
        if conn.head_end < 0:
            conn.page = False  # a new request: the upload form's, once its head is in
            while conn.buf.startswith(b"\r\n"):  # empty lines before a request line are ignored (RFC 9112 2.2)
                del conn.buf[:2]
            end = conn.buf.find(b"\r\n\r\n")
            if end > MAX_HEAD_BYTES or (end < 0 and len(conn.buf) > MAX_HEAD_BYTES):
                raise RequestError(431, "headers_too_large", f"the headers are larger than {MAX_HEAD_BYTES} bytes")
            if end < 0:
                return None
            conn.head_end = end + 4
            head = bytes(conn.buf[:end])
            conn.page = is_upload_form(head)
            conn.framing = framing = head_framing(head)
            if framing.length > self.limits.max_body_bytes:
                mb = self.limits.max_body_bytes / 2**20
                raise RequestError(413, "too_large", f"the upload is larger than the {mb:g} MB limit")
            if framing.chunked:
                conn.scanner = ChunkScanner(conn.head_end, self.limits.max_body_bytes)
            else:
                self._hold(conn, framing.length)  # all of it, before a byte is read
            if framing.chunked or framing.length:
                conn.enter(BODY, self.limits.body_timeout)
                if framing.expect_continue and len(conn.buf) == conn.head_end:
                    _write_quietly(conn.sock.fileno(), b"HTTP/1.1 100 Continue\r\n\r\n")
        if conn.scanner is not None:
            self._hold(conn, len(conn.buf) - conn.head_end)  # a chunked body: what has come so far
            return conn.scanner.scan(conn.buf)
        end = conn.head_end + conn.framing.length
        return end if len(conn.buf) >= end else None

    def _hold(self, conn: Conn, nbytes: int) -> None:
        """Count ``nbytes`` of body for this connection against the worker's budget (bodies wait in memory while
        received, queued and run), or refuse the request."""
        total = self.held - conn.held + nbytes
        if nbytes > conn.held and total > self.limits.max_buffered_bytes:
            mb = self.limits.max_buffered_bytes / 2**20
            message = f"the server holds {mb:g} MB of uploads already; try again in a moment"
            raise RequestError(503, "busy", message, retry_after=1)
        self.held, conn.held = total, nbytes

    # -- running requests ------------------------------------------------------------------------------
    def _dispatch(self, conn: Conn, raw: bytes) -> None:
        """Run a complete request: inline when light, else in the heavy pool (or 503 when it is full)."""
        conn.phase = BUSY
        self._watch(conn, 0)
        call = AppCall.open(self, raw, conn.addr, conn.server)
        if isinstance(call, bytes):
            self._respond(conn, [call], False)
        elif not self.limits.is_heavy(call.environ):
            # this connection goes, unless its client has sent its next requests already (they would be dropped
            # unanswered); its client reconnects, to a less busy worker
            if not conn.buf and self._surplus():
                conn.shed = True
                self.shedding += 1
                call.resp.force_close()
            self._respond(conn, *call.run())
        elif not self.heavy.submit(conn, call.run):
            self._respond(conn, [busy_answer(conn.page)], False)

    # -- writing ---------------------------------------------------------------------------------------
    def _respond(self, conn: Conn, parts: list[bytes], keep: bool) -> None:
        if conn.phase == CLOSED:
            return
        self._hold(conn, 0)  # the request's body is no longer needed
        conn.out = memoryview(b"".join(parts))
        conn.keep = keep  # what the answer told the client; a stopping worker's drain closes idle ones later
        conn.enter(WRITE, WRITE_TIMEOUT)
        self._flush(conn)

    def _flush(self, conn: Conn) -> None:
        """Send what the socket takes; once all is sent, wait for the next request, or close."""
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
        elif not conn.keep:
            self._linger(conn)
        elif conn.buf:  # the client sent its next request already: served on the next turn of the loop
            conn.enter(HEAD, self.limits.header_timeout)
            self._watch(conn, 0)
            self.pipelined.append(conn)
        else:
            conn.enter(IDLE, self.cfg.keepalive)
            self._watch(conn, selectors.EVENT_READ)

    def _linger(self, conn: Conn) -> None:
        """Close after a final answer: FIN first, then drop what the client still sends for a while, so that
        it reads the answer instead of a reset (RFC 9112 section 9.6)."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.buf = bytearray()
        conn.enter(LINGER, LINGER_SECONDS)
        self._watch(conn, selectors.EVENT_READ)


def _write_quietly(fd: int, data: bytes) -> None:
    """A best-effort write (an interim 100 Continue, a wake-up byte): a full buffer or a gone peer is fine."""
    with contextlib.suppress(OSError):
        os.write(fd, data)


def _exit_now() -> None:
    """End a worker that stopped cleanly without the interpreter's teardown (torch's takes seconds on busy
    cores); logs and output are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)
