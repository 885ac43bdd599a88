"""Benchmarks: ``python -m bench.<name>`` from the repository root, or all of them with ``make bench``."""
