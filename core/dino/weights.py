"""Finding, downloading, verifying and loading the official checkpoints.

Resolution order for a backbone's checkpoint:

1. an explicit path (``--weights PATH``), used as is;
2. ``$TORCH_HOME/hub/checkpoints/<file name>`` (torch.hub's checkpoint cache),
   used without any network access;
3. a download from the family's base URL (or its override) into that cache,
   streamed to a temporary file and renamed into place only when complete.

With no file and no network the error says which file to put where. The
sha256 of every checkpoint used is computed once per process, recorded in
the index manifest and checked again when the service embeds queries, so
that queries are never embedded with other weights than the index.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests
import torch

from core.files import sha256_file

from .backbones import BASE_URL_ENV, DEFAULT_BASE_URL, Backbone
from .vit import VisionTransformer

DOWNLOAD_TIMEOUT = (10, 60)  # connect, read (seconds)


class WeightsUnavailable(RuntimeError):
    """A checkpoint cannot be found, downloaded, verified or loaded; the message says what to do."""


def checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache: ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch`` by default)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def base_url(backbone: Backbone, override: str | None = None) -> str:
    """Where the backbone's family is published: the override, its environment variable, or the official URL."""
    url = override or os.environ.get(BASE_URL_ENV[backbone.family]) or DEFAULT_BASE_URL[backbone.family]
    return url.rstrip("/")


def checkpoint_url(backbone: Backbone, override: str | None = None) -> str:
    return f"{base_url(backbone, override)}/{backbone.checkpoint}"


def _download(url: str, dst: Path, progress: bool) -> None:
    """Stream url to dst through a temporary file in the same folder; dst appears only when complete."""
    from tqdm import tqdm

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        with requests.get(url, stream=True, timeout=DOWNLOAD_TIMEOUT) as r:
            r.raise_for_status()
            total = int(r.headers.get("Content-Length") or 0) or None
            with (
                open(tmp, "wb") as f,
                tqdm(total=total, unit="B", unit_scale=True, desc=dst.name, disable=not progress, leave=False) as bar,
            ):
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
            if total is not None and tmp.stat().st_size != total:
                raise OSError(f"incomplete download: {tmp.stat().st_size} of {total} bytes")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_checkpoint(
    backbone: Backbone,
    weights: str | os.PathLike | None = None,
    *,
    url_override: str | None = None,
    download: bool = True,
    progress: bool = True,
) -> Path:
    """The local path of the backbone's checkpoint, downloading it into torch.hub's cache if needed."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise WeightsUnavailable(f"--weights {path}: no such file (expected the {backbone.label} checkpoint)")
        return path
    cached = checkpoint_dir() / backbone.filename
    if cached.is_file():
        return cached
    url = checkpoint_url(backbone, url_override)
    hint = (
        f"Download {url} elsewhere and put it at {cached} (set TORCH_HOME to change the folder), "
        f"or point {BASE_URL_ENV[backbone.family]} at a mirror."
    )
    if not download:
        raise WeightsUnavailable(
            f"The {backbone.label} checkpoint {backbone.filename} is not in {cached.parent}. {hint}"
        )
    try:
        _download(url, cached, progress)
    except (requests.RequestException, OSError) as e:
        raise WeightsUnavailable(
            f"The {backbone.label} checkpoint {backbone.filename} is not in {cached.parent} "
            f"and could not be downloaded ({e}). {hint}"
        ) from e
    return cached


def _extract_state_dict(obj: object) -> Mapping[str, torch.Tensor]:
    """The backbone's state dict: as is for the released files, or the teacher of a full training checkpoint."""
    if isinstance(obj, Mapping) and "teacher" in obj and isinstance(obj["teacher"], Mapping):
        obj = obj["teacher"]
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict, got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        if not key.startswith("head."):
            out[key] = value
    return out


def load_model(backbone: Backbone, path: Path, device: str | torch.device = "cpu") -> VisionTransformer:
    """Build the backbone and load the checkpoint with ``strict=True``, in eval mode."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        state = _extract_state_dict(obj)
        model = VisionTransformer(backbone.config)
        model.load_state_dict(state, strict=True)
    except Exception as e:  # a truncated file, a pickle, another architecture...
        raise WeightsUnavailable(f"{path} is not a loadable {backbone.label} checkpoint: {e}") from e
    return model.eval().requires_grad_(False).to(device)


@dataclass(frozen=True)
class LoadedBackbone:
    backbone: Backbone
    model: VisionTransformer
    path: Path
    sha256: str


class ModelCache:
    """One model per (backbone, checkpoint, device) per process, shared by every strategy using it.

    Thread-safe: concurrent first requests load the model once; the others wait.
    """

    def __init__(self) -> None:
        self._models: dict[tuple[str, str, str], LoadedBackbone] = {}
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, str, str], threading.Lock] = {}

    def get(
        self,
        backbone: Backbone,
        weights: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        expected_sha256: str | None = None,
        url_override: str | None = None,
        download: bool = True,
        progress: bool = True,
    ) -> LoadedBackbone:
        key = (backbone.code, str(weights or ""), str(device))
        with self._lock:
            if key in self._models:
                loaded = self._models[key]
                _check_sha(loaded, expected_sha256)
                return loaded
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._models:
                    loaded = self._models[key]
                    _check_sha(loaded, expected_sha256)
                    return loaded
            path = resolve_checkpoint(
                backbone, weights, url_override=url_override, download=download, progress=progress
            )
            sha = sha256_file(path, cache=True)
            loaded = LoadedBackbone(backbone, load_model(backbone, path, device), path, sha)
            with self._lock:
                self._models[key] = loaded
            _check_sha(loaded, expected_sha256)
            return loaded

    def loaded(self) -> list[LoadedBackbone]:
        with self._lock:
            return list(self._models.values())


def _check_sha(loaded: LoadedBackbone, expected: str | None) -> None:
    if expected and loaded.sha256 != expected:
        raise WeightsUnavailable(
            f"{loaded.path} has sha256 {loaded.sha256[:12]}..., but the index was built with "
            f"{expected[:12]}...: queries must be embedded with the index's own weights. "
            f"Put the right {loaded.backbone.filename} in place or rebuild the index."
        )


MODELS = ModelCache()
