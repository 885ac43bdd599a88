"""The worker under faults: a full descriptor table, a stop while a model pass runs, a worker killed while it
boots. The worker runs a small WSGI app here (no index)."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT
from gunicorn.config import Config

from devtools.server import free_port

TOY_APP = """
import os, time

class App:
    config = {"SERVING": dict(header_timeout=2.0, body_timeout=3.0, max_body_bytes=2**20, max_buffered_bytes=4 * 2**20,
                              heavy_slots=2, heavy_queue=2, queue_timeout=5.0,
                              is_heavy=lambda environ: environ["PATH_INFO"] == "/heavy")}

    def __call__(self, environ, start_response):
        environ["wsgi.input"].read()
        if environ["PATH_INFO"] == "/heavy":  # a model pass
            time.sleep(float(environ["QUERY_STRING"] or 1))
        body = f"{environ['PATH_INFO']} pid={os.getpid()}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

app = App()
"""


class ToyServer:
    """gunicorn with serving.worker.BufferedWorker, 1 worker, over TOY_APP."""

    def __init__(self, tmp: Path, nofile: int | None = None) -> None:
        (tmp / "toyapp.py").write_text(TOY_APP)
        (tmp / "conf.py").write_text("")
        self.port = free_port()
        self.log_path = tmp / "gunicorn.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        cmd = [sys.executable, "-m", "gunicorn", "-c", str(tmp / "conf.py"), "--no-control-socket", "-w", "1"]
        cmd += ["-k", "serving.worker.BufferedWorker", "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "10"]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp}"}
        self.proc = subprocess.Popen(
            [*cmd, "toyapp:app"], cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=limit
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.exchange(b"GET /ready HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200"):
                    return
            time.sleep(0.05)
        raise AssertionError(self.output())

    def exchange(self, data: bytes, timeout: float = 5.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
            return out

    def worker(self) -> int:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextlib.contextmanager
def toy_server(tmp: Path, **kw):
    srv = ToyServer(tmp, **kw)
    try:
        yield srv
    finally:
        srv.stop()


def _receive(s: socket.socket) -> bytes:
    """One answer (headers and a Content-Length body); what came before the connection closed."""
    out = b""
    while True:
        head, sep, body = out.partition(b"\r\n\r\n")
        if sep and len(body) >= int(head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0):
            return out
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


@pytest.mark.slow
def test_a_full_descriptor_table_pauses_accepting_and_drops_no_connection(tmp_path):
    """Beyond RLIMIT_NOFILE (a soft limit of 1024 is common, beside worker_connections = 1000), accept() fails
    with EMFILE: the worker waits for a descriptor instead of dying with every connection it holds."""
    with toy_server(tmp_path, nofile=64) as srv:
        worker = srv.worker()
        socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(80)]
        try:
            time.sleep(1.0)  # the worker takes what its table holds; the rest wait in the backlog
            socks[0].sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"/first pid=" in _receive(socks[0]), srv.output()[-2000:]
        finally:
            for s in socks:
                s.close()
        time.sleep(0.5)  # descriptors are free again: the backlog's connections are served
        assert srv.exchange(b"GET /after HTTP/1.0\r\n\r\n").endswith(f"/after pid={worker}".encode())
        assert srv.worker() == worker and "Exception in worker process" not in srv.output(), srv.output()[-2000:]


@pytest.mark.slow
def test_a_model_pass_answered_while_the_worker_stops_closes_its_connection(tmp_path):
    """The answer of a model pass that ends after the worker was told to stop says Connection: close, since the
    stopping worker closes the connection right after it: a client that sends its next request on a connection
    the answer kept alive would meet a closed connection."""
    with toy_server(tmp_path) as srv:
        worker = srv.worker()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET /heavy?2 HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.3)
            os.kill(worker, signal.SIGTERM)  # a restart: gunicorn's master sends it to every worker
            answer = _receive(s)
            assert answer.startswith(b"HTTP/1.1 200") and b"/heavy pid=" in answer, answer
            if b"Connection: close" not in answer:  # kept alive: the next request must be answered
                s.sendall(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    following = _receive(s)
                except OSError as e:
                    following = repr(e).encode()
                assert b"/next pid=" in following, (answer, following)


@pytest.mark.slow
def test_the_row_of_a_worker_killed_while_it_boots_is_reused(monkeypatch):
    """A worker killed before it serves (OOM while it loads its models, gunicorn's boot timeout) gives its row
    of the board back: else the master, which claims one per worker it forks, fails after 64 such deaths."""
    from gunicorn.glogging import Logger

    from serving.board import Board
    from serving.worker import BufferedWorker

    monkeypatch.setattr(BufferedWorker, "board", Board(rows=4))
    monkeypatch.setattr(BufferedWorker, "load_wsgi", lambda self: os.kill(os.getpid(), signal.SIGKILL))
    cfg = Config()
    for _ in range(8):
        worker = BufferedWorker(1, os.getpid(), [], None, 30, cfg, Logger(cfg))  # as gunicorn's master does
        pid = os.fork()
        if pid == 0:
            try:
                worker.init_process()
            finally:
                os._exit(1)
        assert os.waitpid(pid, 0)[1] == signal.SIGKILL
        worker.tmp.close()
