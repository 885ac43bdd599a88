"""Decoding and preprocessing banners on the model's device, in batches, ahead of the forwards.

Pillow on the CPU cannot keep up with a GPU's models: files are read in threads, whole batches decoded with
``torchvision.io.decode_jpeg(list, device=...)`` (nvJPEG) and preprocessed on the device
(``Preprocessing.tensor_transform``), by two threads each on its own high-priority CUDA stream (so that their
small kernels do not queue behind the models'), while the caller runs the current batch.

What this decoder should not take goes through the CPU path, counted: anything but a plain 8-bit JPEG of one or
three components, an EXIF-rotated or Adobe RGB JPEG, a file without its end marker, too many pixels, anything
the decoder raises on. So a file is refused for the same reasons, with the same messages, as on the CPU path.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch

from core.images import ImageRejected, check_geometry, check_jpeg_scans, check_progressive_jpeg, open_image

from .preprocess import Preprocessing, largest_resize
from .timing import StageTimer

Decoder = Callable[[list[torch.Tensor]], list[torch.Tensor]]
PREPARE_THREADS = 2

_SOF_PLAIN = (0xC0, 0xC1, 0xC2)  # baseline, extended, progressive Huffman: what nvJPEG decodes
_SOF_OTHER = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)  # lossless, hierarchical, arithmetic


def nvjpeg_decoder(device: str | torch.device) -> Decoder:
    """torchvision's batched JPEG decoder to RGB on ``device`` (nvJPEG on CUDA, libjpeg-turbo on the CPU)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor]) -> list[torch.Tensor]:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in favour of TorchCodec
            warnings.simplefilter("ignore")
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))

    return decode


def plain_jpeg(data: bytes, max_pixels: int, resize_to: Callable[[int, int], tuple[int, int]] | None = None) -> bool:
    """Whether a decoder of plain JPEGs gives what ``open_image`` gives for these bytes (see the module's doc);
    images ``open_image`` would refuse for their geometry or decoding work are not plain: the CPU path refuses
    them, with its message, before the device spends memory on them."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return False
    i, adobe_rgb = 2, False
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        segment = data[i + 4 : i + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and _exif_orientation(segment[6:]) not in (None, 1):
            return False
        if marker == 0xEE and segment[:5] == b"Adobe" and len(segment) >= 12:
            adobe_rgb = segment[11] == 0
        if marker in _SOF_OTHER:
            return False
        if marker in _SOF_PLAIN:
            if len(segment) < 6:
                return False
            precision, comps = segment[0], segment[5]
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            if len(segment) < 6 + 3 * comps:
                return False
            ids = tuple(segment[6 + 3 * c] for c in range(comps))
            sampling = [(segment[7 + 3 * c] >> 4, segment[7 + 3 * c] & 15) for c in range(comps)]
            return (
                precision == 8
                and comps in (1, 3)
                and not (comps == 3 and (adobe_rgb or ids == (82, 71, 66)))  # RGB, not YCbCr, samples
                and 0 < height * width <= max_pixels
                and _within_limits(data, width, height, resize_to, sampling if marker == 0xC2 else None, max_pixels)
            )
        i += 2 + length
    return False


def _within_limits(data: bytes, width: int, height: int, resize_to, progressive, max_pixels: int) -> bool:
    """``open_image``'s checks of a JPEG's header (``progressive``: its components' sampling factors, if it is one;
    decoded at full size here, so a bound at least as strict as the CPU path's)."""
    try:
        check_geometry(width, height, resize_to)
        check_jpeg_scans(data, width * height)
        if progressive:
            check_progressive_jpeg(progressive, width, height, (width, height), max_pixels)
    except ImageRejected:
        return False
    return True


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag of IFD0 of an EXIF block, or None (absent or unreadable: left to Pillow). Read here,
    as Pillow's ``Image.Exif`` parses every tag: ten times slower, in the GIL-bound preparing thread."""
    order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    for e in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * e : ifd + 14 + 12 * e]
        if len(entry) < 12:
            return None
        if int.from_bytes(entry[:2], order) == 0x0112:
            return int.from_bytes(entry[8:10], order)
    return None


class Prepared(NamedTuple):
    """A batch ready for the forwards: rows for ``indices``, one tensor per preprocessing, and the inputs that
    failed, with why."""

    indices: list[int]
    tensors: list[torch.Tensor]
    failures: list[tuple[int, str]]


class DeviceBatches:
    """Iterate over prepared batches of ``paths``, each prepared in the background one batch ahead."""

    def __init__(
        self,
        paths: Sequence[Path],
        preprocessings: Sequence[Preprocessing],
        device: torch.device,
        *,
        batch_size: int,
        decoder: Decoder | None = None,
        read_workers: int = 8,
        max_pixels: int,
        timer: StageTimer | None = None,
    ) -> None:
        self.paths = list(paths)
        self.preprocessings = list(preprocessings)
        self.cpu_transforms = [p.transform() for p in self.preprocessings]
        self.device = device
        self.batch_size = batch_size
        self.decoder = decoder or nvjpeg_decoder(device)
        self.read_workers = max(1, read_workers)
        self.max_pixels = max_pixels
        self.resize_to = largest_resize(self.preprocessings)  # the geometry limits, as on the CPU path
        self.timer = timer or StageTimer(device)
        self._local = threading.local()  # each preparing thread's own CUDA stream

    def __iter__(self) -> Iterator[Prepared]:
        starts = range(0, len(self.paths), self.batch_size)
        with (
            ThreadPoolExecutor(self.read_workers, thread_name_prefix="read") as pool,
            ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="prepare") as preparer,
        ):
            ahead: deque = deque()
            try:
                for start in starts:  # the batch being used, and PREPARE_THREADS batches being prepared
                    ahead.append(preparer.submit(self._prepare, start, pool))
                    if len(ahead) > PREPARE_THREADS:
                        yield self._ready(ahead.popleft().result())
                while ahead:
                    yield self._ready(ahead.popleft().result())
            finally:
                for f in ahead:
                    f.cancel()

    def _ready(self, prepared: Prepared) -> Prepared:
        if self.device.type == "cuda":  # used on the caller's stream now: keep the allocator from reusing early
            current = torch.cuda.current_stream(self.device)
            for t in prepared.tensors:
                t.record_stream(current)
        return prepared

    def _prepare(self, start: int, pool: ThreadPoolExecutor) -> Prepared:
        t0 = time.perf_counter()
        if self.device.type == "cuda" and not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device, priority=-1)
        stream = getattr(self._local, "stream", None)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            prepared = self._prepare_on_stream(start, pool)
            if stream is not None:
                stream.synchronize()
        self.timer.add("decoding", time.perf_counter() - t0)
        return prepared

    def _prepare_on_stream(self, start: int, pool: ThreadPoolExecutor) -> Prepared:
        positions = range(start, min(start + self.batch_size, len(self.paths)))
        datas = list(pool.map(_read, (self.paths[i] for i in positions)))
        failures: list[tuple[int, str]] = []
        jpegs: list[int] = []  # batch positions for the device decoder
        others: list[int] = []  # for the CPU path
        for j, data in enumerate(datas):
            if isinstance(data, str):
                failures.append((positions[j], data))
            elif plain_jpeg(data, self.max_pixels, self.resize_to):
                jpegs.append(j)
            else:
                others.append(j)
        decoded, refused = self._decode(jpegs, datas)
        others = sorted(others + refused)
        self.timer.count("decoded on the device", len(decoded))
        self.timer.count("decoded on the CPU", len(others))
        on_cpu: dict[int, list[torch.Tensor]] = {}
        cpu_path = functools.partial(
            decode_on_cpu, transforms=self.cpu_transforms, max_pixels=self.max_pixels, resize_to=self.resize_to
        )
        for j, result in zip(others, pool.map(cpu_path, (datas[j] for j in others)), strict=True):
            if isinstance(result, str):
                failures.append((positions[j], result))
            else:
                on_cpu[j] = result
        ok = sorted([*decoded, *on_cpu])
        row = {j: r for r, j in enumerate(ok)}
        tensors = [self._assemble(p, k, ok, row, decoded, on_cpu) for k, p in enumerate(self.preprocessings)]
        failures.sort()
        return Prepared([positions[j] for j in ok], tensors, failures)

    def _decode(self, jpegs: list[int], datas: list) -> tuple[dict[int, torch.Tensor], list[int]]:
        """Decode on the device; a batch that fails is retried file by file, and what still fails is refused."""
        if not jpegs:
            return {}, []
        inputs = [torch.frombuffer(bytearray(datas[j]), dtype=torch.uint8) for j in jpegs]
        try:
            return dict(zip(jpegs, self.decoder(inputs), strict=True)), []
        except RuntimeError:
            decoded, refused = {}, []
            for j, x in zip(jpegs, inputs, strict=True):
                try:
                    decoded[j] = self.decoder([x])[0]
                except RuntimeError:
                    refused.append(j)
            return decoded, refused

    def _assemble(self, prep: Preprocessing, k: int, ok: list[int], row: dict, decoded: dict, on_cpu: dict):
        """One (B, 3, h, w) tensor for the batch: device-decoded images grouped by size, CPU ones copied in."""
        h, w = prep.output_size
        out = torch.empty((len(ok), 3, h, w), device=self.device)
        by_shape: dict[tuple, list[int]] = {}
        for j in decoded:
            by_shape.setdefault(tuple(decoded[j].shape), []).append(j)
        for group in by_shape.values():
            rows = torch.tensor([row[j] for j in group], device=self.device)
            out[rows] = prep.tensor_transform(torch.stack([decoded[j] for j in group]))
        if on_cpu:
            rows = torch.tensor([row[j] for j in on_cpu], device=self.device)
            out[rows] = torch.stack([on_cpu[j][k] for j in on_cpu]).to(self.device, non_blocking=True)
        return out


def decode_on_cpu(
    source: bytes | Path, transforms: Sequence, max_pixels: int, resize_to: Callable, image_op: Callable | None = None
) -> list[torch.Tensor] | str:
    """The CPU path: ``open_image``, ``image_op`` and each transform; or why the file is refused or unreadable."""
    try:
        img = open_image(source, max_pixels=max_pixels, resize_to=resize_to)
        if image_op is not None:
            img = image_op(img)
        return [t(img) for t in transforms]
    except ImageRejected as e:
        return f"{e.code}: {e.message}"
    except OSError as e:
        return f"unreadable: {e}"


def _read(path: Path) -> bytes | str:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        return f"unreadable: {e}"
