"""The web-free core: DINO, image decoding, exact kNN and the index format, for ``app`` and ``indexer``."""
