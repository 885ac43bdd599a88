"""The core: DINO models, strategies, weights, preprocessing, image decoding, exact kNN and the index format.

It knows nothing of the web (no Flask, no Werkzeug): the service (``app``) and the offline pipeline
(``indexer``) are both built on it, and it runs where they cannot (a GPU build machine without Flask).
"""
