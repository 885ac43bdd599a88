#!/usr/bin/env python
"""The command ``indexer.cli.fetch_catalog``, also installed as ``steam-dino-fetch-catalog``."""

from indexer.cli.fetch_catalog import main

if __name__ == "__main__":
    raise SystemExit(main())
