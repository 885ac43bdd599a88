#!/usr/bin/env python
"""Fetch the Steam store's catalog (games, names, banner paths) into an APPS.json.

A thin entry point: the command is ``indexer.cli.fetch_catalog`` (also installed as ``steam-dino-fetch-catalog``).
"""

from indexer.cli.fetch_catalog import main

if __name__ == "__main__":
    raise SystemExit(main())
