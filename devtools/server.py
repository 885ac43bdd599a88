"""Start the real service under gunicorn on 127.0.0.1 and a free port: one launcher for tests and benchmarks.

Development only (not part of the installed packages): ``tests/`` and ``bench/`` import it from the
repository root (``python -m bench.X`` runs there; pytest's ``pythonpath`` setting adds it).
``GunicornServer(env, log_path)`` starts the Procfile's command, ``python -m serving.launch``, i.e. ``gunicorn
-c gunicorn.conf.py wsgi:app`` with the environment given (2 workers unless it says), ``wait_ready()`` waits
for ``/health`` to answer 200 (every worker serving), ``stop()`` stops it gracefully; ``running_server`` does
all three around a block.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from core.isolated import DECODER_NAME
from devtools.cgroup import MemoryCgroup

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_control_socket() -> list[str]:
    """gunicorn >= 24 opens a control socket at a fixed path (~/.gunicorn/gunicorn.ctl, shared by every
    instance) and takes seconds to close it at exit: benchmark servers run without it."""
    try:
        from gunicorn.config import Config

        return ["--no-control-socket"] if "control_socket_disable" in Config().settings else []
    except ImportError:
        return []


def decoders(pid: int) -> set[int]:
    """The image decoders (``core.isolated``) that a process forked, from any of its threads, and that still run."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:  # the thread ended meanwhile
            continue
        for child in children:
            try:
                stat = Path(f"/proc/{child}/stat").read_bytes()
            except OSError:  # ended and reaped meanwhile
                continue
            name, state = stat[stat.index(b"(") + 1 : stat.rindex(b")")], stat[stat.rindex(b")") + 2 :][:1]
            if name == DECODER_NAME and state != b"Z":
                out.add(int(child))
    return out


class GunicornServer:
    """The service under gunicorn, on 127.0.0.1 and a free port (no control socket)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        cgroup: MemoryCgroup | None = None,  # a memory group the child joins before it runs gunicorn
    ) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.url = f"http://{self.host}:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "HOST": self.host, "PORT": str(self.port), "WEB_CONCURRENCY": "2"} | env
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "serving.launch", *_no_control_socket()],  # the Procfile's command
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=cgroup.join if cgroup is not None else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Seconds from launch to the first 200 from /health."""
        while time.monotonic() - self.started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
                conn.request("GET", "/health")
                ok = conn.getresponse().status == 200
                conn.close()
                if ok:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"gunicorn did not answer /health within {timeout} s:\n{self.output()[-3000:]}")

    def workers(self, expect: int | None = None, timeout: float = 30.0) -> list[int]:
        """The children of the master's main thread (its decoder launcher's thread forks the image decoders)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        deadline = time.monotonic() + timeout
        while True:
            pids = sorted(int(p) for p in children.read_text().split()) if children.exists() else []
            if expect is None or len(pids) == expect or time.monotonic() > deadline:
                return pids
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then any worker still alive is killed by its pid.

        Not SIGINT/SIGQUIT (gunicorn's quick shutdown): a gthread worker that gets SIGQUIT while its main
        thread is inside ThreadPoolExecutor.submit (e.g. a client closing its keep-alive connection at
        that moment) deadlocks on the executor's lock in its signal handler (seen with gunicorn 27)."""
        workers = self.workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)  # gunicorn.conf.py's graceful_timeout is 30 s
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in workers:  # orphaned workers of this server, if any
            with contextlib.suppress(OSError):
                if b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        self.log.close()


@contextlib.contextmanager
def running_server(env: dict[str, str], log_dir: Path, name: str = "gunicorn", **kw) -> Iterator[GunicornServer]:
    """The service, once it answers; ``startup_s``: seconds from launch to the first 200 from /health."""
    srv = GunicornServer(env, log_dir / f"{name}.log", **kw)
    try:
        srv.startup_s = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# -- which worker holds a connection ---------------------------------------------------------------
def _socket_inodes(pid: int) -> set[str]:
    out = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir() if fd_dir.exists() else []:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _server_side(server_port: int) -> list[list[str]]:
    """The fields of /proc/net/tcp's rows for the server side of 127.0.0.1:server_port."""
    local = f"0100007F:{server_port:04X}"
    with open("/proc/net/tcp") as f:
        return [parts for line in f.readlines()[1:] if (parts := line.split())[1] == local]


def connection_owner(server_port: int, client_port: int, pids: Sequence[int]) -> int | None:
    """The worker holding the server side of our 127.0.0.1 connection from ``client_port``."""
    remote = f"0100007F:{client_port:04X}"
    inode = next((parts[9] for parts in _server_side(server_port) if parts[2] == remote), None)
    return next((pid for pid in pids if inode in _socket_inodes(pid)), None) if inode else None


def connections_per_worker(server_port: int, pids: Sequence[int]) -> list[int]:
    """How many established connections to 127.0.0.1:server_port each worker holds."""
    inodes = {parts[9] for parts in _server_side(server_port) if parts[3] == "01"}  # ESTABLISHED
    return [len(inodes & _socket_inodes(pid)) for pid in pids]


def pin_many(
    srv: GunicornServer, pids: Sequence[int], per_worker: int, tries: int = 200
) -> dict[int, list[http.client.HTTPConnection]]:
    """``per_worker`` keep-alive connections held by each worker (fewer if ``tries`` connections did not do)."""
    pinned: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in pids}
    spare = []
    for _ in range(tries):
        conn = http.client.HTTPConnection(srv.host, srv.port, timeout=300)
        conn.request("GET", "/health")
        conn.getresponse().read()
        if conn.sock is None:  # the worker closed it (a worker over its share sheds connections): try again
            continue
        owner = connection_owner(srv.port, conn.sock.getsockname()[1], pids)
        if owner is not None and len(pinned[owner]) < per_worker:
            pinned[owner].append(conn)
        else:
            spare.append(conn)
        if all(len(c) == per_worker for c in pinned.values()):
            break
        time.sleep(0.01)
    for c in spare:
        c.close()
    return {pid: conns for pid, conns in pinned.items() if conns}
