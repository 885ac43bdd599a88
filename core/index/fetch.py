"""Fetching a packed index (a tar archive and its sha256, from ``steam-dino-pack-index``) at boot: a web dyno's disk
starts empty and the release phase runs elsewhere (``INDEX_URL``, ``INDEX_SHA256``).

The archive is checked against the sha256, unpacked into a staging folder, loaded with every check and only then
swapped in: a corrupted, truncated or slow download never replaces a good index. A lock file lets one of several
processes (gunicorn workers) download while the others wait, then find the index in place (``fetched.json``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import requests

from core.files import atomic_write_json, file_lock, sha256_file
from core.http import BodyTooLarge, RetryPolicy, download_file, with_retries

from .reader import IndexInvalid, load_index
from .writer import recover, staging_dir, swap_in

FETCHED = "fetched.json"  # {"url", "sha256"} of the archive the folder was unpacked from
# What can go wrong in one attempt, every one worth another: a mirror serving a half-uploaded archive is fixed soon.
FETCH_ERRORS = (requests.RequestException, OSError, BodyTooLarge, IndexInvalid, tarfile.TarError)
log = logging.getLogger(__name__)


class FetchFailed(RuntimeError):
    """The index could not be fetched, verified or unpacked; the message says why (the last attempt's error)."""


@dataclass(frozen=True)
class FetchPolicy(RetryPolicy):
    """How hard to try (the project's retry policy: attempts per call, pauses), and the limits of each attempt."""

    backoff_s: float = 2.0
    timeout_s: float = 30.0  # connect and per-read timeout
    max_seconds: float = 900.0  # the whole download of one attempt
    max_bytes: int = 8 * 2**30


def fetched_sha256(index_dir: Path) -> str | None:
    """The sha256 of the archive this index folder was unpacked from, if it was fetched."""
    try:
        return str(json.loads((index_dir / FETCHED).read_text(encoding="utf-8"))["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fetch_index(url: str, sha256: str, index_dir: Path, policy: FetchPolicy) -> bool:
    """Make ``index_dir`` the index packed at ``url``; True if it was downloaded, False if already there.
    ``FetchFailed`` after ``policy.attempts`` failed attempts leaves ``index_dir`` unchanged."""
    sha256 = sha256.strip().lower()
    with file_lock(index_dir.parent / f".{index_dir.name}.lock"):
        recover(index_dir)
        for leftover in index_dir.parent.glob(f"*.{index_dir.name}.archive-*"):  # a killed fetch's: none runs now
            leftover.unlink(missing_ok=True)
        if fetched_sha256(index_dir) == sha256:
            return False
        try:
            with_retries(
                lambda: _fetch_once(url, sha256, index_dir, policy),
                policy,
                retry_if=lambda e: isinstance(e, FETCH_ERRORS),
                on_retry=lambda e, n, _: log.warning(
                    "index fetch attempt %d/%d from %s failed: %s: %s", n, policy.attempts, url, type(e).__name__, e
                ),
            )
        except FETCH_ERRORS as e:
            last = f"{type(e).__name__}: {e}"
            raise FetchFailed(f"could not fetch the index from {url} ({policy.attempts} attempts; last: {last})") from e
        return True


def _fetch_once(url: str, sha256: str, index_dir: Path, policy: FetchPolicy) -> None:
    archive = index_dir.parent / f".{index_dir.name}.archive-{os.getpid()}"
    staging = staging_dir(index_dir)
    try:
        download_file(
            url, archive, timeout=policy.timeout_s, max_bytes=policy.max_bytes, max_seconds=policy.max_seconds
        )
        got = sha256_file(archive)
        if got != sha256:
            raise OSError(f"the archive's sha256 is {got[:12]}..., INDEX_SHA256 says {sha256[:12]}...")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(staging, filter="data")  # no absolute paths, links out or special files
        load_index(staging, verify="full")
        atomic_write_json(staging / FETCHED, {"url": url, "sha256": sha256})
        swap_in(staging, index_dir)
    finally:
        archive.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
