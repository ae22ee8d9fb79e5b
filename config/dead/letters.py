"""What a dead letter says about itself: its id, why it died, where it came from and when.

Two writers fill ``omniroute.dead``. omniroute's consumers (``ingest.bus.Bus.dead_letter``)
keep the original headers and add ``x-omniroute-reason`` and ``x-omniroute-source``
(``<exchange>/<routing key>``); the AMQP ``timestamp`` is the dead-lettering's. RabbitMQ
itself dead-letters a quorum queue's message past ``x-delivery-limit`` (reason
``delivery_limit``) or dropped by a ``max-length`` policy (``maxlen``): it adds ``x-death``
(newest first: reason, queue, time, exchange, routing keys) and keeps the original
timestamp. A replay adds ``x-omniroute-replayed`` (how many times) and
``x-omniroute-replayed-at``; a message that dies again keeps them, so the count goes on.
"""

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from ingest.errors import ConfigError
from ingest.topology import REASON_HEADER, SOURCE_HEADER

#: header of a replayed message: how many times it was replayed from omniroute.dead
REPLAYED_HEADER = "x-omniroute-replayed"
#: header of a replayed message: when it was last replayed (RFC 3339, UTC)
REPLAYED_AT_HEADER = "x-omniroute-replayed-at"
#: headers the broker or omniroute write about one death; a replay starts without them
_DEATH_HEADERS = frozenset(
    {
        REASON_HEADER,
        SOURCE_HEADER,
        "x-death",
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
#: the reason a replay refuses: the dead copy carries omniroute's own ``user_id``, which the
#: events worker always believes, so replaying would launder an untrusted publisher's event
NOT_REPLAYABLE = ("untrusted_publisher",)


def text(value: Any) -> str:
    """A header value as text (the broker hands over field-table strings as str or bytes)."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _utc(at: Any) -> datetime | None:
    if not isinstance(at, datetime):
        return None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


@dataclass(frozen=True)
class DeadLetter:
    """One message of ``omniroute.dead`` as a command shows it; ``body`` only when the
    command asked for it (listing keeps none: the queue may hold gigabytes)."""

    message_id: str | None
    reason: str
    exchange: str | None
    routing_key: str | None
    dead_at: datetime | None
    type: str | None
    content_type: str | None
    headers: dict[str, Any]
    size: int
    digest: str
    body: bytes | None = None

    @property
    def id(self) -> str:
        """The AMQP message id; a message without one is named by a digest of its body, its
        reason and its time, which no listing, replay or purge of others changes."""
        return self.message_id or self.digest

    @property
    def code(self) -> str:
        """The reason's stable start: ``unknown_agent``, ``invalid JSON``, ``maxlen``."""
        return self.reason.partition(":")[0]

    @property
    def replayed(self) -> int:
        try:
            return int(self.headers.get(REPLAYED_HEADER, 0))
        except (TypeError, ValueError):
            return 0

    def named_as(self) -> set[str]:
        """The names a command may give it: its message id, its digest."""
        return {name for name in (self.message_id, self.digest) if name}

    def named(self, name: str) -> bool:
        return name in self.named_as()

    def replay_problem(self) -> str | None:
        """Why this letter must not be replayed, or None."""
        if self.code in NOT_REPLAYABLE:
            return (
                f"{self.code}: replaying would publish it as omniroute's own (trusted) user; "
                "have its publisher send it again"
            )
        if not self.exchange:
            return "no source exchange recorded (published to omniroute.dead by hand?)"
        return None

    def replay_headers(self, now: datetime) -> dict[str, Any]:
        """The original headers without those of its death, with the replay recorded."""
        headers = {k: v for k, v in self.headers.items() if k not in _DEATH_HEADERS}
        headers[REPLAYED_HEADER] = self.replayed + 1
        headers[REPLAYED_AT_HEADER] = now.isoformat(timespec="seconds")
        return headers


def read(
    body: bytes,
    headers: Mapping[str, Any] | None,
    *,
    message_id: str | None,
    type_: str | None,
    content_type: str | None,
    timestamp: datetime | None,
    keep_body: bool,
) -> DeadLetter:
    """A dead letter from an AMQP message's body and properties."""
    found = dict(headers or {})
    deaths = found.get("x-death")
    death: Mapping[str, Any] = (
        deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping) else {}
    )
    exchange: str | None = None
    key: str | None = None
    if REASON_HEADER in found:
        reason = text(found[REASON_HEADER])
        dead_at = _utc(timestamp)
        if SOURCE_HEADER in found:
            exchange, _, key = text(found[SOURCE_HEADER]).partition("/")
    elif death:
        reason = (
            f"{text(death.get('reason', 'unknown'))}: dead-lettered by the broker from "
            f"queue {text(death.get('queue', '?'))}"
        )
        dead_at = _utc(death.get("time")) or _utc(timestamp)
        exchange = text(death["exchange"]) if "exchange" in death else None
        keys = death.get("routing-keys")
        key = text(keys[0]) if isinstance(keys, list) and keys else None
    else:
        reason = "unknown: no x-omniroute-reason or x-death header"
        dead_at = _utc(timestamp)
    stamp = dead_at.isoformat() if dead_at else ""
    digest = hashlib.sha256(body + b"\0" + reason.encode() + b"\0" + stamp.encode()).hexdigest()
    return DeadLetter(
        message_id=message_id or None,
        reason=reason,
        exchange=exchange or None,
        routing_key=key,
        dead_at=dead_at,
        type=type_,
        content_type=content_type,
        headers=found,
        size=len(body),
        digest=f"sha256:{digest[:16]}",
        body=body if keep_body else None,
    )


_AGE = re.compile(r"(\d+)\s*([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def age(value: str, option: str) -> timedelta:
    """A duration on the command line: ``30s``, ``90m``, ``24h``, ``7d``."""
    match = _AGE.fullmatch(value.strip())
    if match is None:
        raise ConfigError(f"{option} {value!r}: give a number and s, m, h or d (24h, 7d)")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def cutoff(value: str, option: str, now: datetime) -> datetime:
    """``--since``: a duration back from ``now`` (``24h``) or an RFC 3339 time."""
    if _AGE.fullmatch(value.strip()):
        return now - age(value, option)
    from config.instants import instant

    try:
        return instant(value, option)
    except ConfigError:
        raise ConfigError(
            f"{option} {value!r}: give a duration (24h, 7d) or an RFC 3339 time "
            "(2026-12-31T23:30+03:00)"
        ) from None


@dataclass(frozen=True)
class Selection:
    """Which dead letters a command acts on; every given condition must hold."""

    ids: frozenset[str] = frozenset()
    reason: str | None = None
    since: datetime | None = None
    before: datetime | None = None

    def __call__(self, letter: DeadLetter) -> bool:
        if self.ids and not any(letter.named(name) for name in self.ids):
            return False
        if self.reason is not None and not letter.reason.casefold().startswith(
            self.reason.casefold()
        ):
            return False
        if self.since is not None and (letter.dead_at is None or letter.dead_at < self.since):
            return False
        return self.before is None or (letter.dead_at is not None and letter.dead_at < self.before)
