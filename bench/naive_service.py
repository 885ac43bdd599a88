"""The bare baseline of bench/serve.py: GET /match/<appid> as a minimal Flask app, from in-memory arrays.

It loads apps.json and the strategy's tables once, at import (gunicorn's preload), keeps a dict from
appid to row, and answers with ``jsonify``: the same JSON shape and values as the real service, with
nothing else (no parameter checks, no error mapping, no headers). Served by gunicorn's sync workers
(``bench/naive_gunicorn.conf.py``), the framework's floor for this answer::

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
APPS = json.loads((INDEX_DIR / "apps.json").read_text(encoding="utf-8"))
ROW = {a["appid"]: i for i, a in enumerate(APPS)}
TABLES = {
    d.name: (np.load(d / "neighbours.npy"), np.load(d / "scores.npy"))
    for d in sorted(INDEX_DIR.iterdir())
    if (d / "neighbours.npy").is_file()
}


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
    neighbours, scores = TABLES[strategy]
    row = ROW.get(appid)
    if row is None:
        return jsonify({"error": {"code": "unknown_appid", "message": f"appid {appid} is not in the index"}}), 404
    matches = [
        {"rank": r, **describe(APPS[j]["appid"], APPS[j]["name"]), "score": round(float(s), 6)}
        for r, (j, s) in enumerate(zip(neighbours[row, :k].tolist(), scores[row, :k].tolist(), strict=True), 1)
    ]
    q = APPS[row]
    return jsonify(
        {"strategy": strategy, "k": len(matches), "query": describe(q["appid"], q["name"]), "matches": matches}
    )


@app.get("/health")
def health():
    return jsonify({"status": "ok"})
