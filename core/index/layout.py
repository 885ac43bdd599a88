"""The index folder's names and version: the contract between the builder and the service (README, "The index
folder")."""

FORMAT = "steam-dino-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
APPS = "apps.json"
ARRAYS = ("embeddings.npy", "neighbours.npy", "scores.npy")
EMBEDDING_DTYPES = ("float16", "float32")
VARIANTS_DIR = "variants"
SKETCH_DIR = "sketch"
ATTENTION = "attention.npy"
