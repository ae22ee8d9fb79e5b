"""A time given on the command line (``--at``, ``--until``): an RFC 3339 instant with its
offset. A naive time is refused, as it would mean a different moment in every time zone of
the directory."""

from datetime import datetime

from ingest.errors import ConfigError


def instant(text: str, option: str) -> datetime:
    """``text`` as a timezone-aware datetime, or a ``ConfigError`` naming ``option`` (the CLI
    answers it in one line, exit 2)."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: not an RFC 3339 time (2026-12-31T23:30+03:00)"
        ) from None
    if at.tzinfo is None:
        raise ConfigError(f"{option} {text!r}: give the offset (…+03:00, or Z for UTC)")
    return at
