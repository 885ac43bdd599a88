"""Booting from a fetched index (``INDEX_URL``): the app answers at once and is ready once the index is in place.

A web dyno must bind its port within 60 s, and its disk starts empty. So with
``INDEX_URL`` the app is created without an index: ``/health`` answers 503
``{"status": "starting"}`` and every other endpoint 503 ``starting``, while a
thread fetches and verifies the archive (``core.index.fetch``: atomic, with
retries, one download shared by the workers through a lock file), loads it
and installs the service. If every attempt fails, an index already in
``INDEX_DIR`` (from an earlier boot) is served; with none, fetching goes on,
less and less often, and ``/health`` says why it is not ready. Then the
checkpoints of the index's backbones are fetched into ``$TORCH_HOME`` the same
way (verified against the sha256 the index recorded), so that the first
upload does not wait for a download.

gunicorn does not preload the app in this mode (gunicorn.conf.py): each
worker runs its own boot thread, and the master never imports the app.
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
RETRY_CAP_S = 300.0


class Boot:
    """The fetch-then-serve sequence of one process; ``detail`` says what it is doing or what went wrong."""

    def __init__(self, settings: Settings, install: Callable[[LoadedIndex], object]) -> None:
        self.settings = settings
        self.install = install  # makes the service from the index and puts it in the app
        self.detail = "fetching the index"
        self.weights: dict[str, str] = {}  # backbone code -> "ok" or why not
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="index-boot", daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            index = self._index()
            service = self.install(index)
        except Exception as e:  # e.g. DEFAULT_STRATEGY not in the fetched index: say it on /health, stay 503
            self.detail = f"cannot serve the fetched index: {e}"
            log.exception("cannot serve the fetched index")
            return
        self.detail = "ready"
        self._fetch_weights(service)

    def _index(self) -> LoadedIndex:
        s = self.settings
        policy = FetchPolicy(attempts=s.index_fetch_attempts, max_seconds=s.index_fetch_timeout)
        try:
            return self._fetch(policy)
        except (FetchFailed, IndexInvalid):
            previous = self._previous()
            if previous is not None:
                log.warning("serving the index already in %s (not the one at INDEX_URL)", s.index_dir)
                return previous
        # nothing to serve: fetching goes on, less and less often
        forever = RetryPolicy(attempts=sys.maxsize, backoff_s=2 * policy.backoff_s, max_backoff_s=RETRY_CAP_S)
        return with_retries(
            lambda: self._fetch(policy), forever, retry_if=lambda e: isinstance(e, (FetchFailed, IndexInvalid))
        )

    def _fetch(self, policy: FetchPolicy) -> LoadedIndex:
        s = self.settings
        try:
            fresh = fetch_index(s.index_url, s.index_sha256, s.index_dir, policy)
            return load_index(s.index_dir, verify="quick" if fresh else s.index_verify)
        except (FetchFailed, IndexInvalid) as e:
            self.detail = str(e)
            log.error("%s", e)
            raise

    def _previous(self) -> LoadedIndex | None:
        if not (self.settings.index_dir / "manifest.json").is_file():
            return None
        try:
            return load_index(self.settings.index_dir, verify=self.settings.index_verify)
        except IndexInvalid as e:
            log.error("the index already in %s cannot be served either: %s", self.settings.index_dir, e)
            return None

    def _fetch_weights(self, service) -> None:
        """Each backbone of the index, once, verified against the sha256 the index recorded."""
        s = self.settings
        wanted = {}
        for st in service.index.strategies.values():
            wanted.setdefault(st.strategy.backbone.code, (st.strategy.backbone, st.checkpoint["sha256"]))
        for code, (backbone, sha) in wanted.items():
            try:
                fetch_checkpoint(backbone, sha, attempts=s.index_fetch_attempts, download=s.allow_weights_download)
                self.weights[code] = "ok"
            except WeightsUnavailable as e:
                self.weights[code] = str(e)
                log.warning("weights for %s: %s", code, e)
        if service.preload:
            service.preload_models()


def start_fetching(app: Flask, settings: Settings, install: Callable[[LoadedIndex], object]) -> Boot:
    boot = Boot(settings, install)
    app.extensions[BOOT_KEY] = boot
    boot.start()
    return boot


BOOT_KEY = "steam_dino_boot"
