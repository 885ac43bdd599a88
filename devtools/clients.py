"""Reading a running service's answers, for tests and benchmarks (development only)."""

from __future__ import annotations


def parse_server_timing(header: str | None) -> dict[str, float]:
    """A Server-Timing header's durations in ms, by name."""
    out = {}
    for part in (header or "").split(","):
        name, _, rest = part.strip().partition(";")
        if rest.startswith("dur="):
            out[name] = float(rest[4:])
    return out
