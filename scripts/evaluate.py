#!/usr/bin/env python
"""Measure the retrieval quality of an index's strategies without labels: copy detection and agreement.

A thin entry point: the command is ``indexer.cli.evaluate`` (also installed as ``steam-dino-evaluate``).
"""

from indexer.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
