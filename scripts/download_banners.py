#!/usr/bin/env python
"""The command ``indexer.cli.download_banners``, also installed as ``steam-dino-download-banners``."""

from indexer.cli.download_banners import main

if __name__ == "__main__":
    raise SystemExit(main())
