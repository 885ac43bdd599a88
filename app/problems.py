"""What can go wrong for a client, in the service's own words: no HTTP here (``app/errors.py`` maps it).

Each problem carries a stable ``code`` (the API's error code), a message for people, and optional extra fields
for the JSON body.
"""

from __future__ import annotations


class Problem(Exception):
    """A failure a client can cause or should know about; subclasses say which kind."""

    def __init__(self, code: str, message: str, *, retry_after: int | None = None, **extra: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, for answers worth retrying later
        self.extra = extra


class BadRequest(Problem):
    """A parameter, appid or upload that cannot be used as sent."""


class NotFound(Problem):
    """The thing asked for (a game) is not there."""


class UnsupportedUpload(Problem):
    """The upload is not in a form this service reads (content type, SVG)."""


class Forbidden(Problem):
    """A feature this deployment has switched off, or a target it will not reach."""


class UpstreamFailed(Problem):
    """A server this service relies on (the Steam CDN) failed or sent something unusable."""


class Unavailable(Problem):
    """A part of the service cannot answer now (weights missing, still starting); lookups may still work."""


def bad_parameter(name: str, message: str) -> BadRequest:
    return BadRequest("bad_parameter", f"{name}: {message}", parameter=name)


def unknown_app(appid: int, why: str = "is not in the index") -> NotFound:
    return NotFound("unknown_appid", f"appid {appid} {why}", appid=appid)


def variant_unavailable(variant: str, strategy: str, built: list[str]) -> BadRequest:
    """The 400 for a mirror/flip lookup whose tables this index was built without."""
    have = f"it has {', '.join(built)}" if built else "it has none"
    return BadRequest(
        "variant_unavailable",
        f"{variant} lookups need tables built with scripts/build_index.py --variants mirror,flip "
        f"({strategy} in this index: {have}); uploads take mirror/flip without them",
        parameter="mirror" if "mirror" in variant else "flip",
        available=built,
    )
