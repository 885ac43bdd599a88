"""A deliberately naive design of GET /match/<appid>, the baseline of bench/serve.py.

Per request it reads apps.json and the strategy's table files (neighbours.npy, scores.npy) from disk
and scans the app list for the appid; no memory map, no dict, nothing kept between requests. The
answer has the same shape and values as the real service's. Served by the same gunicorn settings
(``bench/naive_gunicorn.conf.py``)::

    INDEX_DIR=... gunicorn -c bench/naive_gunicorn.conf.py bench.naive_service:app
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from flask import Flask, jsonify, request

app = Flask(__name__)
INDEX_DIR = Path(os.environ.get("INDEX_DIR", "data/index"))
CDN = "https://cdn.cloudflare.steamstatic.com/steam/apps"


def describe(appid: int, name: str) -> dict:
    return {
        "appid": appid,
        "name": name,
        "store_url": f"https://store.steampowered.com/app/{appid}/",
        "banner_url": f"{CDN}/{appid}/library_600x900.jpg",
    }


@app.get("/match/<int:appid>")
def match(appid: int):
    strategy = request.args.get("strategy", "ComplexB16")
    k = int(request.args.get("k", 10))
    apps = json.loads((INDEX_DIR / "apps.json").read_text(encoding="utf-8"))
    neighbours = np.load(INDEX_DIR / strategy / "neighbours.npy")
    scores = np.load(INDEX_DIR / strategy / "scores.npy")
    row = None
    for i, a in enumerate(apps):
        if a["appid"] == appid:
            row = i
            break
    if row is None:
        return jsonify({"error": {"code": "unknown_appid", "message": f"appid {appid} is not in the index"}}), 404
    matches = [
        {"rank": r, **describe(apps[j]["appid"], apps[j]["name"]), "score": round(float(s), 6)}
        for r, (j, s) in enumerate(zip(neighbours[row, :k], scores[row, :k], strict=True), 1)
    ]
    q = apps[row]
    query = describe(q["appid"], q["name"])
    return jsonify({"strategy": strategy, "k": len(matches), "query": query, "matches": matches})


@app.get("/health")
def health():
    return jsonify({"status": "ok"})
