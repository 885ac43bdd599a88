"""Synthetic indexes at real catalog size, for benchmarks and load tests.

Random unit vectors stand in for embeddings (no images, no model), the app
list is the real Steam catalog when ``../shared/data/steam_catalog_2021.json``
is there (29,982 games) or a synthetic one of the same size, extended with
synthetic games past that size (the store today: ``STORE_SIZE``), each with a
store banner path, and the folder is written with the same writer and manifest
as a real build, so the service loads it through exactly the same checks.
"""

from __future__ import annotations

import functools
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.dino.strategies import Strategy
from core.index import APPS, IndexWriter, make_manifest, write_strategy
from core.knn import topk_table

CATALOG_SIZE = 29_982
STORE_SIZE = 150_000  # the Steam store today, with headroom
_WORDS = str.split(
    "Dark Souls Star Wars Pokémon Café Dragon Quest Legend Knight Space Tycoon Simulator Racing Zombie Survival "
    "Hollow Ōkami Tower Defense Puzzle City Farm Battle Royale Cyber Neon Shadow of the Lost Kingdom II 3 VR "
    "Remastered Edition™ Deluxe Ultimate Chronicles: - & 恋愛 ゲーム Straße Ñandú Über Half-Life Portal Saga"
)
SHARED_CATALOG = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "steam_catalog_2021.json"


def load_catalog(path: Path | None = None, n: int | None = None) -> tuple[list[dict], str]:
    """The real 2021 Steam catalog if present (else synthetic games of its size), then synthetic games up to ``n``,
    each with a store banner path (``store_banner``); and where they came from."""
    path = Path(os.environ.get("STEAM_CATALOG", path or SHARED_CATALOG))
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        apps = {int(a["appid"]): str(a.get("name", "")) for a in data if isinstance(a, dict) and "appid" in a}
        out, source = [{"appid": a, "name": apps[a]} for a in sorted(apps)], str(path)
    else:
        out, source = synthetic_games(CATALOG_SIZE, 10), "synthetic"
    if n and n > len(out):
        extra = n - len(out)
        out += synthetic_games(extra, (out[-1]["appid"] if out else 0) + 10, seed=len(out))
        source += f" + {extra:,} synthetic games"
    rng = random.Random(0)
    return [a | {"banner": store_banner(a["appid"], rng)} for a in out[:n]], source


def synthetic_games(n: int, first_appid: int, seed: int = 0) -> list[dict]:
    """``n`` games with store-like names (one to five words, accents, ™, CJK and punctuation among them), appids
    from ``first_appid`` in steps of 10."""
    rng = random.Random(seed)
    return [
        {"appid": first_appid + 10 * i, "name": " ".join(rng.choices(_WORDS, k=rng.randint(1, 5)))} for i in range(n)
    ]


def store_banner(appid: int, rng: random.Random) -> str:
    """A banner path as the store gives it, with its ``?t=`` token: 1 in 20 under a content hash (art re-uploaded
    since early 2025, about 5% of the store today), the others the plain path."""
    token = f"?t={rng.randrange(1_500_000_000, 1_800_000_000)}"
    if rng.random() < 0.05:
        return f"steam/apps/{appid}/{rng.getrandbits(160):040x}/library_600x900.jpg{token}"
    return f"steam/apps/{appid}/library_600x900.jpg{token}"


def synthetic_banner(seed: int, size: tuple[int, int] = (300, 450)) -> Image.Image:
    """A banner-like picture (gradient, random shapes, a title bar), deterministic per seed.

    Distinct seeds give visibly distinct pictures, which is what tests and
    benchmarks need from stand-ins for real banners.
    """
    rng = random.Random(seed)
    w, h = size
    base = np.linspace(0, 1, h)[:, None, None] * np.array([rng.random() for _ in range(3)]) * 255
    base = base + np.array([rng.randint(0, 120) for _ in range(3)])
    img = Image.fromarray(np.clip(np.broadcast_to(base, (h, w, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 9)):
        x0, y0 = rng.randint(0, w - 20), rng.randint(0, h - 20)
        x1, y1 = rng.randint(x0 + 10, w), rng.randint(y0 + 10, h)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    draw.rectangle([0, int(h * 0.8), w, int(h * 0.9)], fill=tuple(rng.randint(0, 255) for _ in range(3)))
    return img


def textured_banner_jpeg(seed: int, size: tuple[int, int] = (600, 900), grain: int = 26, quality: int = 90) -> bytes:
    """A ``synthetic_banner`` with film grain, as JPEG bytes: about the size of Steam's own art.

    Smooth synthetic pictures compress to a few tens of KB; real 600x900 capsules are about 230 KB,
    and decoders' costs scale with the entropy-coded data, so benchmarks of decoding need the grain.
    """
    import io

    base = np.asarray(synthetic_banner(seed, size), dtype=np.int16)
    tile = _grain_tile(size, grain)
    dy, dx = seed % 97, (seed // 97) % 89  # a different window of one shared tile per seed (fast)
    noise = tile[dy : dy + size[1], dx : dx + size[0]]
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@functools.lru_cache(maxsize=4)
def _grain_tile(size: tuple[int, int], grain: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-grain, grain + 1, size=(size[1] + 97, size[0] + 89, 3), dtype=np.int16)


def random_unit_vectors(n: int, dim: int, seed: int, dtype: str = "float32") -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x.astype(dtype, copy=False)


def random_tables(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid-looking tables without the cost of exact ones: distinct neighbours, not self, scores descending."""
    rng = np.random.default_rng(seed)
    offsets = np.stack([rng.choice(n - 1, size=k, replace=False) + 1 for _ in range(min(n, 64))])
    rows = np.arange(n)[:, None]
    neighbours = ((rows + offsets[rows[:, 0] % len(offsets)]) % n).astype(np.int32)
    scores = -np.sort(-rng.uniform(0.2, 0.95, size=(n, k)).astype(np.float32), axis=1)
    return neighbours, scores


def write_synthetic_index(
    out: Path,
    apps: list[dict],
    strategies: list[Strategy],
    *,
    k: int = 100,
    dtype: str = "float16",
    exact_tables: bool = False,
    checkpoint_sha256: dict[str, str] | None = None,
    seed: int = 0,
) -> None:
    """Write an index folder of random embeddings (exact or random tables) that the service accepts."""
    n = len(apps)
    k = min(k, n - 1)
    checkpoint_sha256 = checkpoint_sha256 or {}
    # the next strategy's embeddings are drawn (numpy, without the GIL) while this one is written
    with IndexWriter(out) as writer, ThreadPoolExecutor(1) as pool:
        apps_sha = writer.write_json(APPS, apps)
        entries = {}
        draw = [functools.partial(random_unit_vectors, n, s.dim, seed + i, dtype) for i, s in enumerate(strategies)]
        upcoming = pool.submit(draw[0]) if draw else None
        for i, s in enumerate(strategies):
            emb = upcoming.result()
            upcoming = pool.submit(draw[i + 1]) if i + 1 < len(draw) else None
            if exact_tables:
                neighbours, scores = topk_table(emb, k)
            else:
                neighbours, scores = random_tables(n, k, seed + i)
            checkpoint = {"file": s.backbone.filename, "sha256": checkpoint_sha256.get(s.backbone.code, "0" * 64)}
            entries[s.name] = write_strategy(writer, s, emb, neighbours, scores, checkpoint, precision="fp32")
        manifest = make_manifest(n, apps_sha, dtype, entries, skipped_images=[], missing_images=[], synthetic=True)
        writer.commit(manifest)
