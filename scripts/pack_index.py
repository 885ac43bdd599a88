#!/usr/bin/env python
"""Pack an index (all or some of its strategies) into one archive and its sha256, for INDEX_URL deploys.

A thin entry point: the command is ``indexer.cli.pack_index`` (also installed as ``steam-dino-pack-index``).
"""

from indexer.cli.pack_index import main

if __name__ == "__main__":
    raise SystemExit(main())
