#!/usr/bin/env python
"""The command ``indexer.cli.build_index``, also installed as ``steam-dino-build-index``."""

from indexer.cli.build_index import main

if __name__ == "__main__":
    raise SystemExit(main())
