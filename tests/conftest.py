"""Shared test fixtures: the official-output fixtures, random checkpoints, a temporary TORCH_HOME,
generated banners, and a local HTTP file server.

Nothing here reaches the network: checkpoints are random weights in the
official layout, written once per test session and linked into a fresh
``$TORCH_HOME/hub/checkpoints/`` for each test that needs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import http.server
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import background
import pytest
import torch

from core.dino.backbones import BACKBONES
from core.dino.vit import VisionTransformer
from devtools.fake_steam import start_http_server
from devtools.server import GunicornServer, free_port  # noqa: F401 - the shared launcher, re-exported to tests
from devtools.synthetic import synthetic_banner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@dataclass
class CliRun:
    """What a command printed and returned, like subprocess.CompletedProcess."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_main(capsys) -> Callable[..., CliRun]:
    """Run a command's ``main(argv)`` in this process: the same code as the script, without the seconds a
    new interpreter spends importing torch. Environment variables: set them with ``monkeypatch``."""

    def run(main: Callable[[list[str]], int], *args: str) -> CliRun:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return CliRun(code, out, err)

    return run


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected
def pytest_collection_modifyitems(config, items):
    """The commands some tests wait for start now, in the background (tests/background.py); the benchmark
    smoke tests run last."""
    if not config.option.collectonly:
        background.start_for({item.path.name for item in items})
    smoke = [item for item in items if item.path.name == "test_bench_smoke.py"]
    items[:] = [item for item in items if item.path.name != "test_bench_smoke.py"] + smoke


def pytest_unconfigure(config):
    background.stop_all()


def kill_after_chunks(proc: subprocess.Popen, chunks: Path, timeout: float, count: int = 3) -> None:
    """SIGKILL a running build once its work folder holds ``count`` embedded chunks (it must not finish first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(list(chunks.glob("*.npz"))) < count and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def arrays_of(index: Path) -> dict[str, bytes]:
    """An index folder's arrays and apps list, byte for byte: what two builds must agree on."""
    return {str(p.relative_to(index)): p.read_bytes() for p in sorted(index.rglob("*.npy"))} | {
        "apps.json": (index / "apps.json").read_bytes()
    }


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
    """A synthetic banner file (devtools.synthetic.synthetic_banner), deterministic per seed."""
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
        server = start_http_server(handler)
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


NAMES = ["Pokémon Quest", "STAR WARS™ Battlefront", "Portal 2", "Portal", "Half-Life 2", "Café Racer", "Stardew Valley"]


def store_banner(appid: int) -> str | None:
    """The store's banner path of a generated game, as a catalog gives it: one in three under a content hash (art
    re-uploaded), one in three the plain path with its token, one in three none (the store gave no capsule)."""
    token = f"?t={1_700_000_000 + appid}"
    plain = f"steam/apps/{appid}/library_600x900.jpg"
    return [None, f"steam/apps/{appid}/{appid:040x}/library_600x900.jpg{token}", f"{plain}{token}"][appid // 10 % 3]


def make_catalog(folder: Path, n: int, first_appid: int = 10) -> list[dict]:
    """n generated banners in folder and their apps list (a few real-looking names, accents included, and the
    store's banner paths: ``store_banner``)."""
    apps = []
    for i in range(n):
        appid = first_appid + 10 * i
        make_banner(folder / f"{appid}.jpg", seed=appid)
        apps.append({"appid": appid, "name": NAMES[i] if i < len(NAMES) else f"Game {appid}"})
        if banner := store_banner(appid):
            apps[-1]["banner"] = banner
    return apps


@dataclass
class BuiltIndex:
    root: Path
    index: Path
    banners: Path
    torch_home: Path
    apps: list[dict]
    strategies: list[str]


def build_generated_index(root: Path, checkpoint_store, names: list[str], n: int, k: int, **options) -> BuiltIndex:
    """``n`` generated banners in ``root/banners`` and their index of ``names`` in ``root/index``, with the
    random checkpoints linked into ``root/torch_home`` (TORCH_HOME for anything that embeds against it)."""
    from core.dino.strategies import parse_strategies
    from indexer.build import BuildConfig, build_index

    strategies = parse_strategies(",".join(names))
    torch_home = root / "torch_home"
    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    for code in dict.fromkeys(s.backbone.code for s in strategies):
        src = checkpoint_store(code)
        os.symlink(src, ckpt / src.name)
    apps = make_catalog(root / "banners", n)
    (root / "apps.json").write_text(json.dumps(apps))
    config = BuildConfig(
        images=root / "banners", out=root / "index", strategies=strategies, k=k, apps_file=root / "apps.json"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(torch_home))
        build_index(dataclasses.replace(config, progress=False, **options))
    return BuiltIndex(root, root / "index", root / "banners", torch_home, apps, names)


@pytest.fixture(scope="session")
def built_index(tmp_path_factory, checkpoint_store) -> BuiltIndex:
    """An index of 24 generated banners (SimpleS16, ComplexS16, ComplexB16; k=10), built once per session."""
    names = ["SimpleS16", "ComplexS16", "ComplexB16"]
    return build_generated_index(tmp_path_factory.mktemp("built"), checkpoint_store, names, n=24, k=10)


@pytest.fixture
def index_copy(built_index, tmp_path):
    """A copy of the session's index to spoil or rewrite."""
    return shutil.copytree(built_index.index, tmp_path / "index")


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


def server_env(built: BuiltIndex, **extra: str) -> dict[str, str]:
    """The service's environment over ``built``, with ``extra`` settings."""
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
