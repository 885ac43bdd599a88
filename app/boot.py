"""Booting from a fetched index (``INDEX_URL``): the app answers at once and is ready once the index is in place.

A web dyno must bind its port within 60 s and its disk starts empty, so with ``INDEX_URL`` the app is created
without an index and answers 503 ``starting`` (``/health`` says why) while a thread fetches and verifies the
archive (``core.index.fetch``: atomic, one download shared by the workers through a lock file), loads it and
installs the service. After a failed round an index already in ``INDEX_DIR`` (from an earlier boot) is served;
with none, fetching goes on, less and less often. Then the index's checkpoints are fetched into ``$TORCH_HOME``,
verified against the recorded sha256, so that the first upload does not wait for a download.

gunicorn does not preload the app in this mode (gunicorn.conf.py): each worker runs its own boot thread.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from flask import Flask

from core.dino.weights import WeightsUnavailable, fetch_checkpoint
from core.http import RetryPolicy, with_retries
from core.index import IndexInvalid, LoadedIndex, load_index
from core.index.fetch import FetchFailed, FetchPolicy, fetch_index

from .config import Settings

log = logging.getLogger(__name__)
BOOT_KEY = "steam_dino_boot"


class Boot:
    """The fetch-then-serve sequence of one process; ``detail`` says what it is doing or what went wrong."""

    def __init__(self, settings: Settings, install: Callable[[LoadedIndex], object]) -> None:
        self.settings = settings
        self.install = install  # makes the service from the index and puts it in the app
        self.detail = "fetching the index"

    def run(self) -> None:
        s = self.settings
        policy = FetchPolicy(attempts=s.index_fetch_attempts, max_seconds=s.index_fetch_timeout)
        # rounds of fetch_index's own attempts, until one succeeds, paused longer and longer
        rounds = RetryPolicy(attempts=sys.maxsize, backoff_s=2 * policy.backoff_s, max_backoff_s=300.0)
        try:
            index = with_retries(
                lambda: self._round(policy), rounds, retry_if=lambda e: isinstance(e, (FetchFailed, IndexInvalid))
            )
            service = self.install(index)
        except Exception as e:  # e.g. DEFAULT_STRATEGY not in the fetched index: say it on /health, stay 503
            self.detail = f"cannot serve the fetched index: {e}"
            log.exception("cannot serve the fetched index")
            return
        self.detail = "ready"
        self._fetch_weights(service)

    def _round(self, policy: FetchPolicy) -> LoadedIndex:
        """The index at INDEX_URL, else the one already in INDEX_DIR; the round's error when neither."""
        s = self.settings
        try:
            fresh = fetch_index(s.index_url, s.index_sha256, s.index_dir, policy)
            return load_index(s.index_dir, verify="quick" if fresh else s.index_verify)
        except (FetchFailed, IndexInvalid) as e:
            self.detail = str(e)
            log.error("%s", e)
            failed = e
        if not (s.index_dir / "manifest.json").is_file():
            raise failed
        try:
            previous = load_index(s.index_dir, verify=s.index_verify)
        except IndexInvalid as e:
            log.error("the index already in %s cannot be served either: %s", s.index_dir, e)
            raise failed from None
        log.warning("serving the index already in %s (not the one at INDEX_URL)", s.index_dir)
        return previous

    def _fetch_weights(self, service) -> None:
        """Each backbone of the index, once, verified against the sha256 the index recorded."""
        s = self.settings
        wanted = {}
        for st in service.index.strategies.values():
            wanted.setdefault(st.strategy.backbone.code, (st.strategy.backbone, st.checkpoint["sha256"]))
        for code, (backbone, sha) in wanted.items():
            try:
                fetch_checkpoint(backbone, sha, attempts=s.index_fetch_attempts, download=s.allow_weights_download)
            except WeightsUnavailable as e:
                log.warning("weights for %s: %s", code, e)
        service.preload_models()


def start_fetching(app: Flask, settings: Settings, install: Callable[[LoadedIndex], object]) -> None:
    """Fetch the index in a thread; the app's ``BOOT_KEY`` extension reports how it goes."""
    boot = app.extensions[BOOT_KEY] = Boot(settings, install)
    threading.Thread(target=boot.run, name="index-boot", daemon=True).start()
