"""Service settings, read once from environment variables (see the README's Configuration table).

Each field names its variable, default and range; a bad value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from urllib.parse import urlparse

from core.env import is_http_url, parse_bool, parse_float, parse_whole
from core.steam import API_URL, ASSETS_URL


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


def _var(name: str, default: object, lo: float | None = None, hi: float | None = None, parse: Callable | None = None):
    """A field read from the variable ``name`` by ``parse(name, raw, default)``, or as its default's type is."""
    meta = {"env": name, "lo": lo, "hi": hi, "parse": parse}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def _read(meta: Mapping, raw: str, default: object) -> object:
    name, lo, hi = meta["env"], meta["lo"], meta["hi"]
    if meta["parse"] is not None:
        return meta["parse"](name, raw.strip(), default)
    if isinstance(default, bool):
        return parse_bool(name, raw, default)
    if isinstance(default, int):
        return parse_whole(name, raw, default, lo, hi)
    if isinstance(default, float):
        return parse_float(name, raw, default, lo, hi)
    if isinstance(default, list):
        return [v.strip() for v in raw.split(",") if v.strip()]
    raw = raw.strip()
    return default if not raw else Path(raw) if isinstance(default, Path) else raw


def _zero_is_none(hi: int) -> Callable:
    """A whole number from 0 to ``hi``, where 0 (the default) means "not set": None."""
    return lambda name, raw, _: parse_whole(name, raw, 0, 0, hi) or None


def _choice(*allowed: str) -> Callable:
    def parse(name: str, raw: str, default: str) -> str:
        if raw and raw not in allowed:
            raise ConfigError(f"{name}={raw!r}: expected {' or '.join(allowed)}")
        return raw or default

    return parse


def _http_url(name: str, raw: str, default: str | None) -> str | None:
    if raw and not is_http_url(raw):
        raise ConfigError(f"{name}={raw!r}: expected an http(s) URL with a host")
    return raw or default


def _public_url(name: str, raw: str, _: None) -> str | None:
    """'https://example.com/app' -> 'https://example.com/app/' (the base of absolute URLs); empty -> None."""
    if not raw:
        return None
    if not is_http_url(raw) or (parsed := urlparse(raw)).query or parsed.fragment:
        raise ConfigError(f"{name}={raw!r}: expected an http(s) URL such as https://banners.example.com/")
    return raw.rstrip("/") + "/"


def _rate(name: str, raw: str, _: None) -> tuple[int, float] | None:
    """'10/minute' -> (10, 60.0); empty -> None (no limit)."""
    if not raw:
        return None
    count, _, period = raw.lower().partition("/")
    seconds = {"second": 1.0, "minute": 60.0, "hour": 3600.0}.get(period.rstrip("s"))
    if seconds is None or not count.isdigit() or int(count) < 1:
        raise ConfigError(f"{name}={raw!r}: expected N/second, N/minute or N/hour, N at least 1")
    return int(count), seconds


def _storage_uri(name: str, raw: str, default: str) -> str:
    if raw and not raw.startswith(("memory://", "redis://", "rediss://", "redis+unix://")):
        raise ConfigError(f"{name}={raw!r}: expected memory:// or a redis:// URI")
    return raw or default


def _origins(name: str, raw: str, _: list) -> list[str]:
    """'*' or origins, as a browser's Origin header has them: 'https://a.example/' -> 'https://a.example'."""
    out = []
    for origin in filter(None, (v.strip() for v in raw.split(","))):
        if origin != "*":
            origin = origin.removesuffix("/")
            parsed = urlparse(origin) if is_http_url(origin) else None
            if parsed is None or parsed.path or parsed.query or parsed.fragment or parsed.params:
                raise ConfigError(f"{name}: {origin!r} is not an origin (e.g. https://front.example) or *")
        out.append(origin)
    return out


def _networks(name: str, raw: str, _: list) -> list[str]:
    """CIDR networks, checked now (a typo must not open or close the door silently)."""
    out = []
    for net in filter(None, (v.strip() for v in raw.split(","))):
        try:
            out.append(str(ipaddress.ip_network(net, strict=False)))
        except ValueError:
            raise ConfigError(f"{name}: {net!r} is not an IP network (e.g. 10.0.0.0/8)") from None
    return out


@dataclass(frozen=True)
class Settings:
    index_dir: Path = _var("INDEX_DIR", Path("data/index"))
    banners_dir: Path = _var("BANNERS_DIR", Path("data/banners"))
    default_strategy: str | None = _var("DEFAULT_STRATEGY", None)  # None: ComplexB16 if built, else the first
    max_upload_mb: float = _var("MAX_UPLOAD_MB", 8.0, 0.01, 1024)
    max_image_pixels: int = _var("MAX_IMAGE_PIXELS", 40_000_000, 1, 1_000_000_000)
    upload_timeout: float = _var("UPLOAD_TIMEOUT", 30.0, 0.1, 3600)
    # serving.worker: from a request's first byte to the end of its headers; model passes at once per worker;
    # uploads waiting for one (beyond: 503), and how long; request bodies held in memory at once (then 503)
    header_timeout: float = _var("HEADER_TIMEOUT", 10.0, 0.1, 3600)
    upload_concurrency: int = _var("UPLOAD_CONCURRENCY", 1, 1, 64)
    upload_queue: int = _var("UPLOAD_QUEUE", 8, 0, 10_000)
    upload_queue_timeout: float = _var("UPLOAD_QUEUE_TIMEOUT", 10.0, 0.1, 3600)
    upload_buffer_mb: float = _var("UPLOAD_BUFFER_MB", 64.0, 0.01, 65536)  # unset: at least MAX_UPLOAD_MB
    cors_origins: list[str] = _var("CORS_ORIGINS", [], parse=_origins)
    torch_threads: int | None = _var("TORCH_THREADS", None, parse=_zero_is_none(256))
    index_verify: str = _var("INDEX_VERIFY", "full", parse=_choice("full", "quick"))
    preload_models: list[str] = _var("PRELOAD_MODELS", [])
    allow_weights_download: bool = _var("ALLOW_WEIGHTS_DOWNLOAD", True)
    weights_retry_seconds: float = _var("WEIGHTS_RETRY_SECONDS", 60.0, 0, 86400)
    # the store: banners' URLs under the assets' base; GetItems (the fallback's banner paths) under the Web API's
    assets_url: str = _var("STEAM_ASSETS_URL", ASSETS_URL, parse=_http_url)
    steam_api_url: str = _var("STEAM_API_URL", API_URL, parse=lambda n, raw, d: _http_url(n, raw.rstrip("/"), d))
    fallback_fetch: bool = _var("FALLBACK_FETCH", False)
    fallback_timeout: float = _var("FALLBACK_TIMEOUT", 5.0, 0.1, 60)
    fallback_max_mb: float = _var("FALLBACK_MAX_MB", 5.0, 0.01, 100)
    fallback_cache_size: int = _var("FALLBACK_CACHE_SIZE", 1024, 0, 1_000_000)
    fallback_negative_ttl: float = _var("FALLBACK_NEGATIVE_TTL", 300.0, 0, 86400)
    upload_rate_limit: tuple[int, float] | None = _var("UPLOAD_RATE_LIMIT", None, parse=_rate)
    # memory://: per worker; redis://host:port for one limit across workers
    rate_limit_storage_uri: str = _var("RATE_LIMIT_STORAGE_URI", "memory://", parse=_storage_uri)
    proxy_hops: int = _var("PROXY_HOPS", 0, 0, 10)
    max_k: int | None = _var("MAX_K", None, parse=_zero_is_none(100_000))  # None: the width of the tables
    concurrent_forwards: int = _var("CONCURRENT_FORWARDS", 1, 1, 64)  # model forward passes at once per process
    index_url: str | None = _var("INDEX_URL", None, parse=_http_url)  # fetch the packed index at boot
    index_sha256: str | None = _var("INDEX_SHA256", None)  # required with index_url
    index_fetch_attempts: int = _var("INDEX_FETCH_ATTEMPTS", 4, 1, 100)
    index_fetch_timeout: float = _var("INDEX_FETCH_TIMEOUT", 900.0, 0.1, 86400)  # the whole download of one attempt
    public_url: str | None = _var("PUBLIC_URL", None, parse=_public_url)  # for absolute URLs; None: relative
    max_batch: int = _var("MAX_BATCH", 50, 1, 1000)  # appids in one GET /match?appids=...
    cache_max_age: int = _var("CACHE_MAX_AGE", 3600, 0, 31_536_000)  # Cache-Control max-age of precomputed answers
    url_fetch: bool = _var("URL_FETCH", False)  # POST /match {"url": ...}
    url_fetch_timeout: float = _var("URL_FETCH_TIMEOUT", 5.0, 0.1, 60)
    url_fetch_max_mb: float = _var("URL_FETCH_MAX_MB", 8.0, 0.01, 100)
    # refused by default; e.g. for tests
    url_fetch_allow_networks: list[str] = _var("URL_FETCH_ALLOW_NETWORKS", [], parse=_networks)

    @property
    def max_upload_bytes(self) -> int:
        """MAX_UPLOAD_MB in bytes: Flask's MAX_CONTENT_LENGTH and the upload reader's cap."""
        return int(self.max_upload_mb * 2**20)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            default = [] if f.default is MISSING else f.default
            try:
                values[f.name] = _read(f.metadata, env.get(f.metadata["env"], ""), default)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        _check_together(values, env)
        return cls(**values)


def _check_together(values: dict, env: Mapping[str, str]) -> None:
    """The rules between settings: an upload fits the body buffer; INDEX_URL and INDEX_SHA256 go together."""
    upload, buffer = values["max_upload_mb"], values["upload_buffer_mb"]
    if not env.get("UPLOAD_BUFFER_MB", "").strip():
        values["upload_buffer_mb"] = max(buffer, upload)
    elif buffer < upload:
        raise ConfigError(
            f"UPLOAD_BUFFER_MB={buffer:g} is less than MAX_UPLOAD_MB={upload:g}: one upload would not fit"
        )
    url, sha = values["index_url"], (values["index_sha256"] or "").lower() or None
    if url is None and sha is not None:
        raise ConfigError("INDEX_SHA256 is set without INDEX_URL")
    if url is not None and not re.fullmatch("[0-9a-f]{64}", sha or ""):
        raise ConfigError(
            "INDEX_SHA256: expected the 64 hex digits of the archive's sha256 "
            "(printed by steam-dino-pack-index) whenever INDEX_URL is set"
        )
    values["index_sha256"] = sha
