#!/usr/bin/env python
"""Download Steam vertical banners for a list of appids: a thin CLI over indexer.download.

A thin entry point: the command is ``indexer.cli.download_banners`` (also installed as ``steam-dino-download-banners``).
"""

from indexer.cli.download_banners import main

if __name__ == "__main__":
    raise SystemExit(main())
