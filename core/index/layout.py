"""The index folder's names and version: the contract between the builder and the service.

Layout (written by ``scripts/build_index.py``)::

    manifest.json              format and version, creation time, apps, and per strategy:
                               dim, k, backbone, checkpoint file and sha256, preprocessing,
                               style parameters, and the shape, dtype and sha256 of its files
    apps.json                  [{"appid": 10, "name": "Counter-Strike"}, ...] in row order, with the
                               store's banner path ("banner") where the catalog gave one
    <Strategy>/embeddings.npy  (N, D) float16/float32, L2-normalised, row i = apps[i]
    <Strategy>/neighbours.npy  (N, K) int32 row indices, best first, the row itself excluded
    <Strategy>/scores.npy      (N, K) float32 cosine similarity of each neighbour
    <Strategy>/sketch/*.npy    the embeddings' int8 sketch (core/sketch.py), the upload search's
                               prefilter: codes.npy (N, D) int8, columns.npy (D,) and rows.npy (3, N)
                               float64; optional (an index without it gets one made in memory)
    <Strategy>/variants/<variant>/*.npy   optional mirror/flip query tables (same three arrays)
    <Strategy>/attention.npy   (N, h, w) float16, the last block's [CLS] attention to each patch, averaged
                               over the heads, on the strategy's patch grid; optional (older indexes)
"""

FORMAT = "steam-dino-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
APPS = "apps.json"
ARRAYS = ("embeddings.npy", "neighbours.npy", "scores.npy")
EMBEDDING_DTYPES = ("float16", "float32")
VARIANTS_DIR = "variants"
SKETCH_DIR = "sketch"
ATTENTION = "attention.npy"
