"""Service settings, read once from environment variables (see the README's Configuration table).

Every value is parsed and checked at start-up: a typo in the environment stops
the service with a message naming the variable, rather than surfacing later as
a wrong answer.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from core.env import parse_bool
from core.steam import DEFAULT_CDN_URL


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value}: expected {lo}..{hi}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a number") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value}: expected {lo}..{hi}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    try:
        return parse_bool(name, env.get(name), default)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _list(env: Mapping[str, str], name: str) -> list[str]:
    return [v.strip() for v in env.get(name, "").split(",") if v.strip()]


def _rate(env: Mapping[str, str], name: str) -> tuple[int, float] | None:
    """'10/minute' -> (10, 60.0); empty -> None (no limit)."""
    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    periods = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
    count, _, period = raw.partition("/")
    try:
        n = int(count)
        seconds = periods[period.rstrip("s")]
    except (ValueError, KeyError):
        raise ConfigError(f"{name}={raw!r}: expected N/second, N/minute or N/hour") from None
    if n < 1:
        raise ConfigError(f"{name}={raw!r}: N must be at least 1")
    return n, seconds


def _public_url(env: Mapping[str, str], name: str) -> str | None:
    """'https://example.com/app' -> 'https://example.com/app/' (the base of absolute URLs); empty -> None."""
    raw = env.get(name, "").strip()
    if not raw:
        return None
    parsed = urlparse(raw)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
        raise ConfigError(f"{name}={raw!r}: expected an http(s) URL such as https://banners.example.com/")
    return raw.rstrip("/") + "/"


def _storage_uri(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip() or "memory://"
    if not raw.startswith(("memory://", "redis://", "rediss://", "redis+unix://")):
        raise ConfigError(f"{name}={raw!r}: expected memory:// or a redis:// URI")
    return raw


def _networks(env: Mapping[str, str], name: str) -> list[str]:
    """CIDR networks, checked now (a typo must not open or close the door silently)."""
    out = []
    for raw in _list(env, name):
        try:
            out.append(str(ipaddress.ip_network(raw, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return out


def _upload_buffer_mb(env: Mapping[str, str]) -> float:
    """UPLOAD_BUFFER_MB: at least MAX_UPLOAD_MB, or the largest allowed upload could never be received."""
    upload = _float(env, "MAX_UPLOAD_MB", 8.0, 0.01, 1024)
    buffer = _float(env, "UPLOAD_BUFFER_MB", max(64.0, upload), 0.01, 65536)
    if buffer < upload:
        raise ConfigError(
            f"UPLOAD_BUFFER_MB={buffer:g} is less than MAX_UPLOAD_MB={upload:g}: one upload would not fit"
        )
    return buffer


@dataclass(frozen=True)
class Settings:
    index_dir: Path = Path("data/index")
    banners_dir: Path = Path("data/banners")
    default_strategy: str | None = None  # None: ComplexB16 if built, else the index's first strategy
    max_upload_mb: float = 8.0
    max_image_pixels: int = 40_000_000
    upload_timeout: float = 30.0
    upload_read_timeout: float = 10.0
    header_timeout: float = 10.0  # serving.worker: from a request's first byte to the end of its headers
    upload_concurrency: int = 1  # serving.worker: model passes at once per worker
    upload_queue: int = 8  # serving.worker: uploads waiting for one, per worker (beyond: 503)
    upload_queue_timeout: float = 10.0  # serving.worker: how long one may wait (then 503)
    upload_buffer_mb: float = 64.0  # serving.worker: request bodies held in memory at once, per worker (then 503)
    cors_origins: list[str] = field(default_factory=list)
    torch_threads: int | None = None
    index_verify: str = "full"
    preload_models: list[str] = field(default_factory=list)
    allow_weights_download: bool = True
    weights_retry_seconds: float = 60.0
    cdn_url: str = DEFAULT_CDN_URL
    fallback_fetch: bool = False
    fallback_timeout: float = 5.0
    fallback_max_mb: float = 5.0
    fallback_cache_size: int = 1024
    fallback_negative_ttl: float = 300.0
    upload_rate_limit: tuple[int, float] | None = None
    rate_limit_storage_uri: str = "memory://"  # per worker; redis://host:port for one limit across workers
    proxy_hops: int = 0
    max_k: int | None = None  # None: the width of the tables
    concurrent_forwards: int = 1  # model forward passes at once per process
    index_url: str | None = None  # fetch the packed index from here at boot, into index_dir
    index_sha256: str | None = None  # required with index_url
    index_fetch_attempts: int = 4
    index_fetch_timeout: float = 900.0  # the whole download of one attempt
    public_url: str | None = None  # "https://example.com/" for absolute URLs in responses; None: relative
    max_batch: int = 50  # appids in one GET /match?appids=...
    cache_max_age: int = 3600  # Cache-Control max-age of precomputed answers
    url_fetch: bool = False  # POST /match {"url": ...}
    url_fetch_timeout: float = 5.0
    url_fetch_max_mb: float = 8.0
    url_fetch_allow_networks: list[str] = field(default_factory=list)  # refused by default; e.g. for tests

    @property
    def upload_rate_limit_text(self) -> str | None:
        """UPLOAD_RATE_LIMIT in Flask-Limiter's notation ("10 per 60 second")."""
        if self.upload_rate_limit is None:
            return None
        count, seconds = self.upload_rate_limit
        return f"{count} per {int(seconds)} second"

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes: Flask's MAX_CONTENT_LENGTH and the upload reader's cap."""
        return int(self.max_upload_mb * 2**20)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        verify = env.get("INDEX_VERIFY", "full").strip() or "full"
        if verify not in ("full", "quick"):
            raise ConfigError(f"INDEX_VERIFY={verify!r}: expected full or quick")
        threads = _int(env, "TORCH_THREADS", 0, 0, 256)
        cdn = env.get("STEAM_CDN_URL", "").strip() or DEFAULT_CDN_URL
        if not cdn.startswith(("https://", "http://")):
            raise ConfigError(f"STEAM_CDN_URL={cdn!r}: expected an http(s) URL")
        index_url, index_sha256 = _index_source(env)
        return cls(
            index_dir=Path(env.get("INDEX_DIR", "").strip() or "data/index"),
            banners_dir=Path(env.get("BANNERS_DIR", "").strip() or "data/banners"),
            default_strategy=env.get("DEFAULT_STRATEGY", "").strip() or None,
            max_upload_mb=_float(env, "MAX_UPLOAD_MB", 8.0, 0.01, 1024),
            max_image_pixels=_int(env, "MAX_IMAGE_PIXELS", 40_000_000, 1, 1_000_000_000),
            upload_timeout=_float(env, "UPLOAD_TIMEOUT", 30.0, 0.1, 3600),
            upload_read_timeout=_float(env, "UPLOAD_READ_TIMEOUT", 10.0, 0.1, 3600),
            header_timeout=_float(env, "HEADER_TIMEOUT", 10.0, 0.1, 3600),
            upload_concurrency=_int(env, "UPLOAD_CONCURRENCY", 1, 1, 64),
            upload_queue=_int(env, "UPLOAD_QUEUE", 8, 0, 10_000),
            upload_queue_timeout=_float(env, "UPLOAD_QUEUE_TIMEOUT", 10.0, 0.1, 3600),
            upload_buffer_mb=_upload_buffer_mb(env),
            cors_origins=_list(env, "CORS_ORIGINS"),
            torch_threads=threads or None,
            index_verify=verify,
            preload_models=_list(env, "PRELOAD_MODELS"),
            allow_weights_download=_bool(env, "ALLOW_WEIGHTS_DOWNLOAD", True),
            weights_retry_seconds=_float(env, "WEIGHTS_RETRY_SECONDS", 60.0, 0, 86400),
            cdn_url=cdn.rstrip("/"),
            fallback_fetch=_bool(env, "FALLBACK_FETCH", False),
            fallback_timeout=_float(env, "FALLBACK_TIMEOUT", 5.0, 0.1, 60),
            fallback_max_mb=_float(env, "FALLBACK_MAX_MB", 5.0, 0.01, 100),
            fallback_cache_size=_int(env, "FALLBACK_CACHE_SIZE", 1024, 0, 1_000_000),
            fallback_negative_ttl=_float(env, "FALLBACK_NEGATIVE_TTL", 300.0, 0, 86400),
            upload_rate_limit=_rate(env, "UPLOAD_RATE_LIMIT"),
            rate_limit_storage_uri=_storage_uri(env, "RATE_LIMIT_STORAGE_URI"),
            proxy_hops=_int(env, "PROXY_HOPS", 0, 0, 10),
            max_k=_int(env, "MAX_K", 0, 0, 100_000) or None,
            concurrent_forwards=_int(env, "CONCURRENT_FORWARDS", 1, 1, 64),
            index_url=index_url,
            index_sha256=index_sha256,
            index_fetch_attempts=_int(env, "INDEX_FETCH_ATTEMPTS", 4, 1, 100),
            index_fetch_timeout=_float(env, "INDEX_FETCH_TIMEOUT", 900.0, 0.1, 86400),
            public_url=_public_url(env, "PUBLIC_URL"),
            max_batch=_int(env, "MAX_BATCH", 50, 1, 1000),
            cache_max_age=_int(env, "CACHE_MAX_AGE", 3600, 0, 31_536_000),
            url_fetch=_bool(env, "URL_FETCH", False),
            url_fetch_timeout=_float(env, "URL_FETCH_TIMEOUT", 5.0, 0.1, 60),
            url_fetch_max_mb=_float(env, "URL_FETCH_MAX_MB", 8.0, 0.01, 100),
            url_fetch_allow_networks=_networks(env, "URL_FETCH_ALLOW_NETWORKS"),
        )


def _index_source(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """INDEX_URL and INDEX_SHA256: both or neither (an archive is never used unverified)."""
    url = env.get("INDEX_URL", "").strip() or None
    sha = env.get("INDEX_SHA256", "").strip().lower() or None
    if url is None:
        if sha is not None:
            raise ConfigError("INDEX_SHA256 is set without INDEX_URL")
        return None, None
    if not url.startswith(("https://", "http://")):
        raise ConfigError(f"INDEX_URL={url!r}: expected an http(s) URL")
    if sha is None or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ConfigError(
            "INDEX_SHA256: expected the 64 hex digits of the archive's sha256 "
            "(printed by steam-dino-pack-index) whenever INDEX_URL is set"
        )
    return url, sha
