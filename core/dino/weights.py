"""Finding, downloading, verifying and loading the official checkpoints.

A backbone's checkpoint is an explicit path (``--weights PATH``), else ``$TORCH_HOME/hub/checkpoints/<file>``
(torch.hub's cache, used without network), else downloaded there from its family's base URL, renamed into place
only when complete; with neither, the error says which file to put where. The sha256 of every checkpoint used is
recorded in the index manifest and checked again when the service embeds queries.

Models are memory-mapped (``torch.load(mmap=True)``, ``assign=True``), so their weights are the page cache's
pages of the file, shared by every worker. A checkpoint in torch's pre-1.6 format, which cannot be mapped, is
converted once into ``mmap/<sha256 prefix>-<file name>`` beside the cache.
"""

from __future__ import annotations

import logging
import os
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from core.files import atomic_file, file_lock, sha256_file
from core.http import BodyTooLarge, RetryPolicy, download_file, with_retries

from .backbones import BASE_URL_ENV, DEFAULT_BASE_URL, Backbone

if TYPE_CHECKING:  # torch is imported when a model is loaded (the service's master never needs it)
    import torch

    from .vit import VisionTransformer

DOWNLOAD_TIMEOUT = (10, 60)  # connect, read (seconds)
MAX_CHECKPOINT_BYTES = 4 * 2**30  # the largest official file (ViT-L/14 with registers) is ~1.2 GB


class WeightsUnavailable(RuntimeError):
    """A checkpoint cannot be found, downloaded, verified or loaded; the message says what to do."""


class WeightsMismatch(WeightsUnavailable):
    """The checkpoint in place is not the one the index was built with (or not loadable): retrying cannot help."""


def checkpoint_dir() -> Path:
    """torch.hub's checkpoint cache: ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch`` by default)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def checkpoint_url(backbone: Backbone) -> str:
    """Where the checkpoint is published: under its family's environment variable (a mirror), or the official URL."""
    base = os.environ.get(BASE_URL_ENV[backbone.family]) or DEFAULT_BASE_URL[backbone.family]
    return f"{base.rstrip('/')}/{backbone.checkpoint}"


def resolve_checkpoint(
    backbone: Backbone,
    weights: str | os.PathLike | None = None,
    *,
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
    url = checkpoint_url(backbone)
    missing = f"The {backbone.label} checkpoint {backbone.filename} is not in {cached.parent}"
    hint = (
        f"Download {url} elsewhere and put it at {cached} (set TORCH_HOME to change the folder), "
        f"or point {BASE_URL_ENV[backbone.family]} at a mirror."
    )
    if not download:
        raise WeightsUnavailable(f"{missing}. {hint}")
    try:
        download_file(url, cached, timeout=DOWNLOAD_TIMEOUT, max_bytes=MAX_CHECKPOINT_BYTES, progress=progress)
    except (requests.RequestException, OSError, BodyTooLarge) as e:
        raise WeightsUnavailable(f"{missing} and could not be downloaded ({e}). {hint}") from e
    return cached


def fetch_checkpoint(
    backbone: Backbone, expected_sha256: str, *, attempts: int = 4, backoff_s: float = 2.0, download: bool = True
) -> Path:
    """Have the backbone's checkpoint in the cache, verified and mappable, before any upload needs it (boot).
    One process downloads (a lock file) while the others wait; a failed download is retried. ``WeightsUnavailable``
    after the last attempt, at once for a sha256 mismatch or without downloads allowed."""
    cached = checkpoint_dir() / backbone.filename

    def fetch() -> Path:
        with file_lock(cached.with_name(f".{cached.name}.lock")):
            path = resolve_checkpoint(backbone, download=download, progress=False)
            sha = sha256_file(path, cache=True)
            _check_sha(path, backbone, sha, expected_sha256)
            try:
                mappable_checkpoint(path, sha)
            except Exception as e:  # an unreadable legacy file
                raise WeightsMismatch(f"{path} is not a loadable {backbone.label} checkpoint: {e}") from e
            return path

    return with_retries(
        fetch,
        RetryPolicy(attempts=attempts, backoff_s=backoff_s),
        retry_if=lambda e: download and isinstance(e, WeightsUnavailable) and not isinstance(e, WeightsMismatch),
        on_retry=lambda e, n, _: logging.getLogger(__name__).warning("%s (attempt %d/%d)", e, n, attempts),
    )


def mappable_checkpoint(path: Path, sha256: str | None = None) -> Path:
    """The checkpoint as a file torch can memory-map: itself if it is a zip archive (torch.save's format
    since 1.6), else a copy converted once into the cache, named by the sha256 of the original."""
    if zipfile.is_zipfile(path):
        return path
    sha256 = sha256 or sha256_file(path, cache=True)
    converted = checkpoint_dir() / "mmap" / f"{sha256[:16]}-{path.name}"
    if converted.is_file():
        return converted
    import torch

    state = _extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    converted.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(converted) as f:
        torch.save(dict(state), f)
    return converted


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


def load_model(
    backbone: Backbone, path: Path, device: str | torch.device = "cpu", *, sha256: str | None = None
) -> VisionTransformer:
    """Build the backbone and load the checkpoint with ``strict=True``, in eval mode, its weights mapped.
    ``sha256`` (of ``path``, when the caller has it) names the converted copy of an unmappable file."""
    import torch

    from .vit import VisionTransformer

    try:
        mapped = mappable_checkpoint(path, sha256)
        state = _extract_state_dict(torch.load(mapped, map_location="cpu", weights_only=True, mmap=True))
        with torch.device("meta"):  # no memory for the random initial weights: the file's tensors replace them
            model = VisionTransformer(backbone.config)
        model.load_state_dict(state, strict=True, assign=True)
        if any(t.dtype != torch.float32 for t in model.state_dict().values()):
            model = model.float()  # a half-precision checkpoint: converted to float32, a private copy
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
    """One model per (backbone, checkpoint, device) per process, shared by every strategy using it; thread-safe."""

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
        download: bool = True,
    ) -> LoadedBackbone:
        """The backbone's model, loaded on first use (a download shows no progress bar)."""
        key = (backbone.code, str(weights or ""), str(device))
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one thread loads; the others wait for its model
            if key not in self._models:
                path = resolve_checkpoint(backbone, weights, download=download, progress=False)
                sha = sha256_file(path, cache=True)
                _check_sha(path, backbone, sha, expected_sha256)  # before loading: a wrong file costs nothing
                loaded = LoadedBackbone(backbone, load_model(backbone, path, device, sha256=sha), path, sha)
                with self._lock:
                    self._models[key] = loaded
            loaded = self._models[key]
        _check_sha(loaded.path, backbone, loaded.sha256, expected_sha256)
        return loaded

    def loaded(self) -> list[LoadedBackbone]:
        with self._lock:
            return list(self._models.values())


def _check_sha(path: Path, backbone: Backbone, sha256: str, expected: str | None) -> None:
    if expected and sha256 != expected:
        raise WeightsMismatch(
            f"{path} has sha256 {sha256[:12]}..., but the index was built with "
            f"{expected[:12]}...: queries must be embedded with the index's own weights. "
            f"Put the right {backbone.filename} in place or rebuild the index."
        )


MODELS = ModelCache()
