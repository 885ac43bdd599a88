"""Shared test fixtures: the official-output fixtures, random checkpoints, a temporary TORCH_HOME,
generated banners, and a local HTTP file server.

Nothing here reaches the network: checkpoints are random weights in the
official layout, written once per test session and linked into a fresh
``$TORCH_HOME/hub/checkpoints/`` for each test that needs them.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from core.dino.backbones import BACKBONES
from core.dino.vit import VisionTransformer
from indexer.synthetic import synthetic_banner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def checkpoint_store(tmp_path_factory):
    """Random checkpoints in the official layout, made on first use, one per backbone code."""
    store = tmp_path_factory.mktemp("checkpoints")

    def get(code: str, seed: int = 0) -> Path:
        backbone = BACKBONES[code]
        path = store / f"seed{seed}" / backbone.filename
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(seed)
            model = VisionTransformer(backbone.config)
            with torch.no_grad():  # make the random model less degenerate: varied norms and biases
                for name, p in model.named_parameters():
                    if name.endswith("bias") or "norm" in name:
                        p.add_(torch.randn_like(p) * 0.1)
            torch.save(model.state_dict(), path)
        return path

    return get


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A fresh, empty TORCH_HOME; returns its hub/checkpoints folder (created)."""
    home = tmp_path / "torch_home"
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    for var in ("DINO_BASE_URL", "DINOV2_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return ckpt


@pytest.fixture
def install_checkpoints(torch_home, checkpoint_store):
    """Put random checkpoints for the given backbone codes into the temporary TORCH_HOME."""

    def install(*codes: str, seed: int = 0) -> dict[str, Path]:
        out = {}
        for code in codes:
            src = checkpoint_store(code, seed)
            dst = torch_home / src.name
            if not dst.exists():
                os.symlink(src, dst)
            out[code] = dst
        return out

    return install


def make_banner(path: Path, seed: int, size: tuple[int, int] = (300, 450), fmt: str | None = None) -> Path:
    """A synthetic banner file (indexer.synthetic.synthetic_banner), deterministic per seed."""
    img = synthetic_banner(seed, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt or ("JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else None), quality=92)
    return path


@pytest.fixture
def banners(tmp_path):
    """A folder of n generated <appid>.jpg banners; returns (folder, apps list)."""

    def make(n: int = 12, folder: Path | None = None, first_appid: int = 10) -> tuple[Path, list[dict]]:
        folder = folder or tmp_path / "banners"
        apps = []
        for i in range(n):
            appid = first_appid + 10 * i
            make_banner(folder / f"{appid}.jpg", seed=appid)
            apps.append({"appid": appid, "name": f"Game {appid}"})
        return folder, apps

    return make


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def file_server():
    """Serve a folder over HTTP on 127.0.0.1 (a free port); returns a function folder -> base URL."""
    servers = []

    def serve(folder: Path) -> str:
        handler = lambda *a, **kw: _QuietHandler(*a, directory=str(folder), **kw)  # noqa: E731
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


NAMES = ["Pokémon Quest", "STAR WARS™ Battlefront", "Portal 2", "Portal", "Half-Life 2", "Café Racer", "Stardew Valley"]


def make_catalog(folder: Path, n: int, first_appid: int = 10) -> list[dict]:
    """n generated banners in folder and their apps list (a few real-looking names, accents included)."""
    apps = []
    for i in range(n):
        appid = first_appid + 10 * i
        make_banner(folder / f"{appid}.jpg", seed=appid)
        apps.append({"appid": appid, "name": NAMES[i] if i < len(NAMES) else f"Game {appid}"})
    return apps


@dataclass
class BuiltIndex:
    root: Path
    index: Path
    banners: Path
    torch_home: Path
    apps: list[dict]
    strategies: list[str]


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, checkpoint_store) -> BuiltIndex:
    """An index of 24 generated banners (SimpleS16, ComplexS16, ComplexB16; k=10), built once per session."""
    from core.dino.strategies import parse_strategies
    from indexer.build import BuildConfig, build_index

    root = tmp_path_factory.mktemp("built")
    torch_home = root / "torch_home"
    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    for code in ("S16", "B16"):
        src = checkpoint_store(code)
        os.symlink(src, ckpt / src.name)
    apps = make_catalog(root / "banners", 24)
    (root / "apps.json").write_text(json.dumps(apps))
    names = ["SimpleS16", "ComplexS16", "ComplexB16"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        build_index(
            BuildConfig(
                images=root / "banners",
                out=root / "index",
                strategies=parse_strategies(",".join(names)),
                k=10,
                apps_file=root / "apps.json",
                progress=False,
            )
        )
    return BuiltIndex(root, root / "index", root / "banners", torch_home, apps, names)


@pytest.fixture
def make_app(built_index, monkeypatch):
    """The Flask app over the session's built index, as the factory makes it; keyword overrides for Settings."""
    from app import create_app
    from app.config import Settings

    monkeypatch.setenv("TORCH_HOME", str(built_index.torch_home))

    def make(**overrides):
        settings = Settings(**({"index_dir": built_index.index, "banners_dir": built_index.banners} | overrides))
        app = create_app(settings)
        app.testing = True
        return app

    return make


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def make_client(make_app):
    """A test client of an app made with these Settings overrides."""
    return lambda **overrides: make_app(**overrides).test_client()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GunicornServer:
    """The real service: gunicorn with the project's config, on 127.0.0.1 and a free port."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        import subprocess

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "WEB_CONCURRENCY": "2"} | env
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop(), the server outlives this call
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from launch to the first /health answer."""
        import time

        import requests

        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return time.monotonic() - start
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gunicorn did not answer /health within {timeout} s: {self.output()[-2000:]}")

    def workers(self, expect: int | None = None, timeout: float = 20.0) -> list[int]:
        """The worker pids (waiting up to timeout for ``expect`` of them to be up)."""
        import time

        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        deadline = time.monotonic() + timeout
        while True:
            pids = [int(p) for p in children.read_text().split()] if children.exists() else []
            if expect is None or len(pids) == expect or time.monotonic() > deadline:
                return pids
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def server_env(built: BuiltIndex, **extra: str) -> dict[str, str]:
    return {
        "INDEX_DIR": str(built.index),
        "BANNERS_DIR": str(built.banners),
        "TORCH_HOME": str(built.torch_home),
        **extra,
    }


@pytest.fixture(scope="module")
def server(built_index, tmp_path_factory):
    """One gunicorn service (2 workers) over the session's built index, shared by a test module."""
    srv = GunicornServer(server_env(built_index), tmp_path_factory.mktemp("server") / "gunicorn.log")
    try:
        srv.startup_s = srv.wait_ready()
        yield srv
    finally:
        srv.stop()
