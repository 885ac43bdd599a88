"""Embedding images for a set of strategies, one image or many, with one code path.

Strategies of one (backbone, preprocessing) share one forward pass per input scale, and each image is decoded
once for all of them. Folders take one of two paths: ``cpu`` (the reference), decoding and Pillow preprocessing
in DataLoader workers; ``device`` (CUDA's default), batched decoding and preprocessing on the device one batch
ahead of the forwards (``device_input.py``). An unreadable file never stops the run: it is reported with its
reason and skipped.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import functools
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from core.cpu import cpu_cores
from core.images import DEFAULT_MAX_PIXELS

from .device_input import DeviceBatches, decode_on_cpu
from .preprocess import Preprocessing, largest_resize
from .strategies import Needs, Strategy
from .timing import StageTimer
from .weights import MODELS, LoadedBackbone, ModelCache

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DECODERS = ("cpu", "device")


def default_precision(device: str) -> str:
    """fp32 on the CPU; bf16 on CUDA, within the fidelity floors of BENCHMARKS.md's GPU section."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_batch_size(device: str) -> int:
    """Larger CPU batches only add cache misses (bench/extract.py)."""
    return 256 if str(device).startswith("cuda") else 16


def configure_threads(threads: int | None = None) -> int:
    """Use one intra-op thread per core (or ``threads``); returns the number set."""
    torch.set_num_threads(max(1, threads or cpu_cores()))
    return torch.get_num_threads()


@dataclass
class Batch:
    """Results for a slice of the input: rows for ``indices``, and the inputs that failed, with why."""

    indices: list[int]
    features: dict[str, np.ndarray]
    failures: list[tuple[int, str]]


class _ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], transforms: list, max_pixels: int, preps, image_op=None) -> None:
        self.paths, self.transforms, self.max_pixels, self.image_op = list(paths), transforms, max_pixels, image_op
        self.resize_to = largest_resize(preps)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        out = decode_on_cpu(self.paths[i], self.transforms, self.max_pixels, self.resize_to, self.image_op)
        return (i, None, out) if isinstance(out, str) else (i, out, None)


def _collate(items):
    ok = [it for it in items if it[1] is not None]
    failures = [(it[0], it[2]) for it in items if it[1] is None]
    tensors = [torch.stack([it[1][j] for it in ok]) for j in range(len(ok[0][1]))] if ok else None
    return [it[0] for it in ok], tensors, failures


def decode_files(paths: Sequence[Path], preps: Sequence[Preprocessing], max_pixels: int = DEFAULT_MAX_PIXELS):
    """One batch decoded and preprocessed as ``iter_files``' CPU workers do it, for other runners (Ray):
    (indices decoded, one tensor per preprocessing or None, failures with why)."""
    files = _ImageFiles(paths, [p.transform() for p in preps], max_pixels, preps)
    return _collate([files[i] for i in range(len(files))])


class Extractor:
    """Embeds images for a fixed set of strategies on one device; cheap, as models come from a shared cache.

    ``checkpoints``: backbone code -> explicit checkpoint path; ``expected_sha256``: backbone code -> the sha256
    the caller requires (the index's). ``attention``: the features also hold each strategy's (B, h, w) attention
    maps, under its ``attention_name``.
    """

    def __init__(
        self,
        strategies: Sequence[Strategy],
        *,
        device: str | None = None,
        precision: str = "fp32",
        checkpoints: dict[str, str | os.PathLike] | None = None,
        expected_sha256: dict[str, str] | None = None,
        download: bool = True,
        models: ModelCache = MODELS,
        attention: bool = False,
    ) -> None:
        if not strategies:
            raise ValueError("no strategy to extract")
        self.device = torch.device(device or default_device())
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}")
        if precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"{precision} is only supported on CUDA; use fp32 on {self.device.type}")
        if self.device.type == "cuda" and precision == "fp32":
            # Exact fp32: no TF32 in matmuls or in the patch-embedding convolution.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.precision, self.attention = precision, attention
        self.strategies = list(strategies)
        self.groups: dict[tuple[str, Preprocessing], list[Strategy]] = {}
        for s in self.strategies:
            self.groups.setdefault(s.group, []).append(s)
        self.preprocessings: list[Preprocessing] = list(dict.fromkeys(p for _, p in self.groups))
        self.transforms = [p.transform() for p in self.preprocessings]
        checkpoints, expected_sha256 = checkpoints or {}, expected_sha256 or {}
        self.backbones: dict[str, LoadedBackbone] = {}
        for b in dict.fromkeys(s.backbone for s in self.strategies):
            sha = expected_sha256.get(b.code)
            self.backbones[b.code] = models.get(
                b, checkpoints.get(b.code), device=self.device, expected_sha256=sha, download=download
            )
        # bf16/fp16: the weights cast once and activations in that type (autocast's float32 residual stream and
        # per-op casts make the forwards slower)
        low = PRECISIONS[precision]
        self._models = {
            code: loaded.model if low is None else copy.deepcopy(loaded.model).to(low)
            for code, loaded in self.backbones.items()
        }

    def embed_tensors(self, tensors: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
        """Features for preprocessed inputs (one (B, 3, H, W) tensor per entry of ``self.preprocessings``)."""
        return {name: feats.cpu().numpy() for name, feats in self._forward(tensors).items()}

    @torch.inference_mode()
    def _forward(self, tensors: Sequence[torch.Tensor], timer: StageTimer | None = None) -> dict[str, torch.Tensor]:
        """Features on the device, one forward per group (timed per backbone when ``timer`` is given)."""
        by_prep = dict(zip(self.preprocessings, tensors, strict=True))
        out: dict[str, torch.Tensor] = {}
        dtype = PRECISIONS[self.precision] or torch.float32
        for (code, prep), strategies in self.groups.items():
            with timer.span(f"forwards {code}") if timer is not None else contextlib.nullcontext():
                model = self._models[code]
                x = by_prep[prep].to(self.device, non_blocking=True)
                needs = functools.reduce(Needs.merge, (s.needs for s in strategies))
                outputs = {}
                for scale in needs.scales:
                    if scale == 1.0:
                        outputs[scale] = model.forward_features(x.to(dtype), needs.n_last_blocks, needs.patch_tokens)
                    else:  # as DINO's utils.multi_scale: bilinear resize of the normalised tensor
                        xs = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
                        outputs[scale] = model.forward_features(xs.to(dtype), 1, False)
                for s in strategies:
                    out[s.name] = s.pool(outputs)
                    if self.attention:
                        out[s.attention_name] = outputs[1.0].attention
        return out

    def preprocess(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """RGB images to one batch tensor per preprocessing."""
        return [torch.stack([t(img) for img in images]) for t in self.transforms]

    def embed_images(self, images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """Features of decoded RGB images (the API's path for an upload: a batch of one)."""
        return self.embed_tensors(self.preprocess(images))

    def default_decode(self) -> str:
        """``device`` on CUDA when every preprocessing has a tensor form, else ``cpu``."""
        tensor_ok = all(p.supports_tensor_input for p in self.preprocessings)
        return "device" if self.device.type == "cuda" and tensor_ok else "cpu"

    def iter_files(
        self,
        paths: Sequence[str | os.PathLike],
        *,
        batch_size: int | None = None,
        num_workers: int | None = None,
        decode: str | None = None,
        timer: StageTimer | None = None,
        image_op: Callable[[Image.Image], Image.Image] | None = None,
    ) -> Iterator[Batch]:
        """Embed image files in order, batch by batch; unreadable files come back as failures. ``decode``: ``cpu``
        or ``device`` (nvJPEG), default ``default_decode()``; ``timer`` collects seconds per stage and counts;
        ``image_op`` (picklable) transforms each image first, on the ``cpu`` path."""
        batch_size = batch_size or default_batch_size(self.device.type)
        decode = "cpu" if image_op is not None else decode or self.default_decode()
        if decode not in DECODERS:
            raise ValueError(f"decode must be one of {', '.join(DECODERS)}")
        paths = [Path(p) for p in paths]
        if decode == "device":
            yield from self._iter_on_device(paths, batch_size, num_workers, timer)
            return
        workers = default_num_workers() if num_workers is None else num_workers
        batches = iter(
            DataLoader(
                _ImageFiles(paths, self.transforms, DEFAULT_MAX_PIXELS, self.preprocessings, image_op),
                batch_size=batch_size,
                num_workers=workers,
                collate_fn=_collate,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=4 if workers else None,
                worker_init_fn=functools.partial(die_with_parent, os.getpid()),
            )
        )
        while True:
            t0 = time.perf_counter()
            item = next(batches, None)
            if timer is not None:
                timer.add("decoding (waited for)", time.perf_counter() - t0)
            if item is None:
                return
            indices, tensors, failures = item
            yield self._batch(indices, failures, self._forward(tensors, timer) if indices else {})

    def _iter_on_device(self, paths, batch_size, num_workers, timer) -> Iterator[Batch]:
        """Forwards of batch i are queued before batch i-1's features are copied back and handed out."""
        read_workers = num_workers or max(4, cpu_cores())
        batches = DeviceBatches(
            paths,
            self.preprocessings,
            self.device,
            batch_size=batch_size,
            read_workers=read_workers,
            max_pixels=DEFAULT_MAX_PIXELS,
            timer=timer,
        )
        pending = None
        for prepared in batches:
            copies = {}
            if prepared.indices:
                feats = self._forward(prepared.tensors, timer)
                copies = {name: f.to("cpu", non_blocking=True) for name, f in feats.items()}
            done = torch.cuda.Event() if self.device.type == "cuda" else None
            if done is not None:
                done.record()
            if pending is not None:
                yield self._batch(*pending)
            pending = (prepared.indices, prepared.failures, copies, done)
        if pending is not None:
            yield self._batch(*pending)

    def _batch(self, indices: list[int], failures: list, features: dict, done=None) -> Batch:
        """The batch's features copied to numpy (once ``done``, an event after their copy, has passed)."""
        if done is not None:
            done.synchronize()
        features = {name: f.cpu().numpy() for name, f in features.items()} if indices else self.no_features()
        return Batch(indices, features, failures)  # no features: every file failed

    def no_features(self) -> dict[str, np.ndarray]:
        """The features of no image: empty arrays of the right shapes."""
        out = {s.name: np.zeros((0, s.dim), dtype=np.float32) for s in self.strategies}
        if self.attention:
            out |= {s.attention_name: np.zeros((0, *s.grid), dtype=np.float32) for s in self.strategies}
        return out

    @torch.inference_mode()
    def patch_matches(self, a: Image.Image, b: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """For each patch of ``a`` its best cosine to the patches of ``b``, and the same for ``b``: two (h, w)
        maps, from the last block's normed patch tokens (the first strategy's backbone and preprocessing)."""
        s = self.strategies[0]
        x = torch.stack([self.transforms[0](a), self.transforms[0](b)])
        x = x.to(self.device, PRECISIONS[self.precision] or torch.float32)
        out = self._models[s.backbone.code].forward_features(x, 1, patch_tokens=True)
        pa, pb = F.normalize(out.patch.float(), dim=-1)
        cos = pa @ pb.T
        return cos.amax(dim=1).reshape(out.grid).cpu().numpy(), cos.amax(dim=0).reshape(out.grid).cpu().numpy()


def die_with_parent(parent: int, _worker_id: int = 0) -> None:
    """Make this (forked) decoding worker die with its parent, kill -9 included, at once: an orphan keeps the
    parent's files (and its build lock) open until its next poll. Linux only (prctl PR_SET_PDEATHSIG); a parent
    that died before the prctl is caught by comparing the parent pid."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def default_num_workers() -> int:
    """Decoding is a few percent of a forward pass on a CPU: one worker is enough there; more for GPUs."""
    return 1 if not torch.cuda.is_available() else max(1, min(8, cpu_cores() - 1))
