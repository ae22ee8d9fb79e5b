"""The stored form of values the tables share: datetimes in UTC, Message-IDs without their
angle brackets."""

from datetime import UTC, datetime


def strip_brackets(message_id: str | None) -> str:
    """RFC 5322 msg-ids compare without their angle brackets and surrounding space."""
    if not message_id:
        return ""
    return message_id.strip().removeprefix("<").removesuffix(">").strip()


def utc(value: datetime) -> datetime:
    """Store UTC only: SQLite keeps no offset, so mixed offsets would compare wrongly."""
    return value.astimezone(UTC)


def aware(value: datetime) -> datetime:
    """A datetime read back: SQLite hands back naive datetimes even for timezone=True
    columns; they are UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
