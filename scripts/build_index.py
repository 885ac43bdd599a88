#!/usr/bin/env python
"""Build an index folder from a folder of banners: DINO embeddings and exact top-k neighbour tables.

A thin entry point: the command is ``indexer.cli.build_index`` (also installed as ``steam-dino-build-index``).
"""

from indexer.cli.build_index import main

if __name__ == "__main__":
    raise SystemExit(main())
