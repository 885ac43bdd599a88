"""Prometheus metrics at ``/metrics``, merged across gunicorn's worker processes.

prometheus-client's multiprocess mode: each process writes its values to files in ``PROMETHEUS_MULTIPROC_DIR``
(gunicorn.conf.py makes or wipes it before prometheus_client is imported) and ``/metrics`` merges them. Without
it (the Flask test client) the metrics are this process's.
"""

from __future__ import annotations

import glob
import os
import time

from flask import Flask, Response, g, request
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None

REQUEST_SECONDS = Histogram(
    "http_request_duration_seconds",
    "Time to answer an HTTP request, by route, method and status.",
    ["endpoint", "method", "status"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
UPLOAD_STAGE_SECONDS = Histogram(
    "upload_stage_seconds",
    "Time spent on an uploaded image, by stage (decode, preprocess, forward, search) and strategy.",
    ["stage", "strategy"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
MODEL_LOADS = Counter("model_loads_total", "Backbone models loaded, by backbone.", ["backbone"])
MODEL_LOAD_SECONDS = Histogram(
    "model_load_seconds", "Time to load a backbone model.", ["backbone"], buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60)
)
MODELS_LOADED = Gauge(
    "models_loaded", "1 for each backbone a live worker has loaded.", ["backbone"], multiprocess_mode="liveall"
)
INDEX_APPS = Gauge("index_apps", "Games in the served index.", multiprocess_mode="livemax")
INDEX_BUILD = Gauge(
    "index_build_info",
    "The served index build (labels; value 1).",
    ["build_id", "created"],
    multiprocess_mode="livemax",
)


def install(app: Flask) -> None:
    """Time every request, and serve ``GET /metrics``."""

    @app.before_request
    def _start_timer():
        g.metrics_t0 = time.perf_counter()

    @app.after_request
    def _observe(resp):
        t0 = g.get("metrics_t0")
        if t0 is not None:
            endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
            REQUEST_SECONDS.labels(endpoint, request.method, resp.status_code).observe(time.perf_counter() - t0)
        return resp

    app.add_url_rule("/metrics", "metrics", metrics_view, methods=["GET"])


def metrics_view() -> Response:
    if MULTIPROC_DIR:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=MULTIPROC_DIR)
    else:
        registry = REGISTRY
    return Response(generate_latest(registry), mimetype="text/plain", headers={"Cache-Control": "no-store"})


def index_loaded(apps: int, build_id: str, created: str | None) -> None:
    INDEX_APPS.set(apps)
    INDEX_BUILD.labels(build_id, created or "").set(1)


def model_loaded(backbone: str, seconds: float) -> None:
    MODEL_LOADS.labels(backbone).inc()
    MODEL_LOAD_SECONDS.labels(backbone).observe(seconds)
    MODELS_LOADED.labels(backbone).set(1)


def upload_timed(strategy: str, timings_ms: dict[str, float]) -> None:
    for stage, ms in timings_ms.items():
        UPLOAD_STAGE_SECONDS.labels(stage, strategy).observe(ms / 1000)


def models_loaded_by_workers(local: list[str]) -> dict[str, int]:
    """How many live workers hold each backbone (this process's own ``local`` list without multiprocess mode)."""
    if not MULTIPROC_DIR:
        return {b: 1 for b in local}
    files = glob.glob(os.path.join(MULTIPROC_DIR, "gauge_liveall_*.db"))
    counts: dict[str, int] = {}
    for metric in multiprocess.MultiProcessCollector.merge(files, accumulate=False):
        if metric.name != "models_loaded":
            continue
        for sample in metric.samples:
            if sample.value >= 1:
                backbone = sample.labels["backbone"]
                counts[backbone] = counts.get(backbone, 0) + 1
    return dict(sorted(counts.items()))
