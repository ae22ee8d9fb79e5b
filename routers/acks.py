"""Acknowledgements to the customer (issue 16; off unless ``[ack]`` is configured).

Sole purpose: once the router's publishes of a batch are confirmed, answer the first message
of each new conversation with a short reply on its own channel (``routers.ack_text``),
published as a ``ReplyRequest`` on ``omniroute.outbound`` for the outbound dispatcher. The
request is omniroute's own: AMQP header ``x-omniroute-ack`` with omniroute's broker
``user_id`` (the dispatcher believes the header only with that user), ``agent_id``
``omniroute:ack`` (never an agent of the directory), ``id`` and AMQP ``message_id``
``ack:<message id>``. The dispatcher sends it like a reply but records nobody as having
answered: no last agent, no thread owner, no assignment or timer closed.

Who gets one: a message routed on its first attempt, on a channel of ``ack.channels``, from
a customer (or any sender with ``ack.unknown_senders``) whose sender is proven, that is
not a bounce, an auto-reply, a mail from a ``noreply``/``mailer-daemon``/``postmaster``
address, a mail omniroute could not parse, or a public X mention (a public reply would
show the customer's name and reference to everyone, and X allows automated replies only to
users who asked for them: an X DM is acknowledged, a mention is not).

New conversation, at most once: the customer has no routed message earlier than this one
within ``ack.quiet_for`` (the ``routed`` table, every channel, every instance), and the
``acks`` ledger takes the claim: one conditional upsert per batch (``INSERT … ON
CONFLICT (key) DO UPDATE SET at = :now WHERE acks.at < :now - quiet_for RETURNING key``),
which the database serialises, so two routers racing for one customer send one. Key
``customer:<id>``, or ``<kind>:<address>`` for an unknown sender. A claimed ack whose
publish fails is released again, so the next message tries; a crash between the two loses
that one acknowledgement rather than ever sending two.

Never in the way: the whole step is bounded by ``DEADLINE``; a failure (directory, broker,
deadline) is logged, counted in ``omniroute_acks_total{result="failed"}`` and swallowed,
so the routed messages are acked to the broker as before.
"""

import asyncio
import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import Connection, Table, bindparam, delete, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.metrics import Metrics
from ingest.schema import Identity, ReplyRequest, RoutedMessage, utcnow
from ingest.sender_auth import verified
from ingest.topology import OUTBOUND
from routers.ack_text import Templates, Words
from routers.directory import DirectoryCache
from routers.models import AckSent, RoutedRecord
from routers.policy import UNVERIFIED
from routers.settings import AckSettings, RoutingSettings
from routers.store.sql import insert_for
from routers.store.transactions import transactions_of
from routers.store.values import aware, utc

log = structlog.get_logger("omniroute.acks")

#: the ``agent_id`` of every acknowledgement: no agent, and never looked up as one
ACK_AGENT = "omniroute:ack"
#: the AMQP header that marks a ReplyRequest as omniroute's own acknowledgement
ACK_HEADER = "x-omniroute-ack"
#: seconds the acknowledgements of one batch may take before the batch is acked without them
DEADLINE = 3.0
#: senders nobody reads (RFC 3834 section 2; mime.py marks mailer-daemon/postmaster bounces)
_NO_REPLY = re.compile(
    r"^(?:no[-_.]?reply|do[-_.]?not[-_.]?reply|mailer[-_.]?daemon|postmaster)(?:$|[-_.+])",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class _Wanted:
    """A message that would be acknowledged if its conversation is new."""

    routed: RoutedMessage
    key: str
    customer_id: str | None


class Acknowledger:
    """The router's optional collaborator: ``await acknowledge(confirmed)`` after each batch.
    Built by ``config.components`` only when ``[ack]`` is set, and replaced as a whole on
    reload."""

    def __init__(
        self,
        *,
        bus: Bus,
        engine: AsyncEngine,
        directory: DirectoryCache,
        settings: AckSettings,
        routing: RoutingSettings,
        templates: Templates,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = utcnow,
        deadline: float = DEADLINE,
    ) -> None:
        self._bus = bus
        self._run = transactions_of(engine)
        self._directory = directory
        self.settings = settings
        self._routing = routing
        self._templates = templates
        self._metrics = metrics
        self._clock = clock
        self._deadline = deadline
        self.published = 0

    def skip_reason(self, routed: RoutedMessage) -> str | None:
        """Why this message gets no acknowledgement whatever the ledger says (None: it may)."""
        message, meta = routed.message, routed.message.meta
        if routed.route.attempt != 1:
            return "routed again, not a new message"
        if message.channel not in self.settings.channels:
            return f"{message.channel} is not in ack.channels"
        if meta.get("bounce") or meta.get("auto_reply"):
            return "a bounce or an automatic reply"
        if meta.get("unparsed") or meta.get("sender_unparsed"):
            return "not parsed"
        if message.channel == "twitter" and meta.get("kind") != "dm":
            return "a public X mention"
        if message.channel == "email" and _NO_REPLY.match(message.sender.address.split("@")[0]):
            return "a no-reply address"
        if self._unverified(routed):
            return "an unverified sender"
        if routed.customer is None and not self.settings.unknown_senders:
            return "an unknown sender"
        return None

    def _unverified(self, routed: RoutedMessage) -> bool:
        # the reason alone is not enough: a closed team's after-hours team decides with
        # reason after_hours, whoever the sender is
        message = routed.message
        if routed.route.reason == UNVERIFIED:
            return True
        return (
            message.channel == "email"
            and bool(self._routing.require_authenticated_email)
            and not verified(message.meta.get("auth"))
        )

    async def acknowledge(self, batch: Sequence[RoutedMessage]) -> int:
        """Acknowledge the new conversations among these confirmed routed messages; the
        number published. Never raises but ``CancelledError``; bounded by the deadline."""
        wanted = self._wanted(batch)
        if not wanted:
            return 0
        try:
            async with asyncio.timeout(self._deadline):
                return await self._acknowledge(wanted)
        except Exception as exc:
            reason = "deadline" if isinstance(exc, TimeoutError) else type(exc).__name__
            log.warning("acks.failed", error=reason, detail=str(exc)[:300], messages=len(wanted))
            for item in wanted:
                self._count(item.routed.message.channel, "failed")
            return 0

    def _wanted(self, batch: Sequence[RoutedMessage]) -> list[_Wanted]:
        """The messages that may be acknowledged, one per ledger key (the earliest)."""
        by_key: dict[str, _Wanted] = {}
        for routed in sorted(batch, key=lambda r: r.route.decided_at):
            if self.skip_reason(routed) is not None:
                continue
            if routed.customer is not None:
                key, customer = f"customer:{routed.customer.id}", routed.customer.id
            else:
                sender = routed.message.sender
                key, customer = f"{sender.kind}:{sender.address}", None
            by_key.setdefault(key, _Wanted(routed, key, customer))
        return list(by_key.values())

    async def _acknowledge(self, wanted: list[_Wanted]) -> int:
        now = self._clock()
        quiet = self.settings.quiet_for
        claimed_keys = await self._run(lambda c: claim(c, wanted, now, quiet))
        claimed = [item for item in wanted if item.key in claimed_keys]
        if not claimed:
            return 0
        replies = await self._replies(claimed, now)
        outcomes = await self._bus.publish_many(
            OUTBOUND,
            [(reply.channel, reply, reply.id) for reply in replies],
            headers={ACK_HEADER: 1},
        )
        lost: list[str] = []
        published: list[str] = []
        for item, reply, outcome in zip(claimed, replies, outcomes, strict=True):
            if outcome is not None:
                lost.append(item.key)
                log.warning(
                    "acks.publish_failed", message_id=item.routed.message.id, error=str(outcome)
                )
                self._count(reply.channel, "failed")
                continue
            published.append(item.routed.message.id)
            self._count(reply.channel, "published")
        self.published += len(published)
        if published:  # one line a batch; the dispatcher logs each one it sends
            log.info("acks.published", count=len(published), message_ids=published)
        if lost:  # the next message of these customers may try again
            await self._run(lambda c: release(c, lost, now))
        return len(claimed) - len(lost)

    async def _replies(self, claimed: list[_Wanted], now: datetime) -> list[ReplyRequest]:
        """The acknowledgement of each claimed message, in the customer's language."""
        region = self._routing.default_region
        known = [item for item in claimed if item.customer_id is not None]
        records = await self._directory.find_customers(
            [item.routed.message.sender for item in known], region
        )
        languages = {
            item.key: record.language
            for item, record in zip(known, records, strict=True)
            if record is not None and record.id == item.customer_id
        }
        teams = await self._directory.get_teams(
            {team for item in claimed if (team := _team_of(item.routed)) is not None}
        )
        replies: list[ReplyRequest] = []
        for item in claimed:
            routed, message = item.routed, item.routed.message
            language = languages.get(item.key) or self.settings.default_language
            team_id = _team_of(routed)
            team_record = teams.get(team_id) if team_id else None
            words = Words(
                # a stranger's own display name is any text they chose (and, unauthenticated,
                # sent to any address): never echoed in a mail from the company's address
                customer_name=routed.customer.name if routed.customer else None,
                team_name=team_record.name if team_record is not None else None,
                reference=reference(message.id),
                opens_at=routed.route.opens_at,
            )
            text = self._templates.render(
                message.channel, language, words, now, fallback=self.settings.default_language
            )
            replies.append(
                ReplyRequest(
                    id=f"ack:{message.id}",
                    channel=message.channel,
                    agent_id=ACK_AGENT,
                    to=Identity(
                        kind=message.sender.kind,
                        address=message.sender.address,
                        name=message.sender.name,
                    ),
                    text=text,
                    subject=message.subject,
                    in_reply_to=message.id,
                )
            )
        return replies

    def _count(self, channel: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.acks.labels(channel, result).inc()


def reference(message_id: str) -> str:
    """``{reference}``: the start of the omniroute message id, short enough to read out on
    the phone; ticket systems have the whole id as the routed message's ``message_id``."""
    return message_id.replace("-", "")[:8].upper()


def _team_of(routed: RoutedMessage) -> str | None:
    """The team a customer is told about: the route's, else (an agent's route) their own."""
    route = routed.route
    if route.kind == "team" and route.target:
        return route.target
    if route.kind == "agent" and routed.customer is not None:
        return routed.customer.team
    return None


# --- the ledger: plain functions of a Connection, one transaction per batch --------------

_ACKS = cast(Table, AckSent.__table__)
_routed, _acks = RoutedRecord.__table__.c, _ACKS.c
#: each customer's earliest routed message within the window, other than the batch's own
_EARLIEST = (
    select(_routed.customer_id, func.min(_routed.routed_at).label("at"))
    .where(
        _routed.customer_id.in_(bindparam("customers", expanding=True)),
        _routed.routed_at >= bindparam("since"),
        _routed.id.not_in(bindparam("own", expanding=True)),
    )
    .group_by(_routed.customer_id)
)


def claim(
    connection: Connection, wanted: Sequence[_Wanted], now: datetime, quiet: timedelta
) -> set[str]:
    """The ledger keys this batch may acknowledge: new conversations whose claim in
    ``acks`` succeeded (inserted, or older than ``quiet``). Runs in one transaction."""
    since = now - quiet
    known = [item for item in wanted if item.customer_id is not None]
    talked: set[str] = set()
    if known:
        rows = connection.execute(
            _EARLIEST,
            {
                "customers": [item.customer_id for item in known],
                "since": utc(since),
                "own": [item.routed.message.id for item in known],
            },
        )
        earliest = {row.customer_id: aware(row.at) for row in rows}
        for item in known:
            first = earliest.get(item.customer_id)
            if first is not None and first < item.routed.route.decided_at:
                talked.add(item.key)  # an earlier message of theirs is the conversation
    keys = [item.key for item in wanted if item.key not in talked]
    if not keys:
        return set()
    claims = [{"key": key, "at": utc(now), "cutoff": utc(since)} for key in keys]
    upsert = _claim_upsert(connection.dialect.name)
    return {row.key for row in connection.execute(upsert, claims)}


@functools.cache
def _claim_upsert(dialect: str) -> Any:
    """``INSERT … ON CONFLICT (key) DO UPDATE SET at = excluded.at WHERE acks.at < :cutoff
    RETURNING key``: the database serialises two claims of one key, and the second finds
    the first's fresh ``at``. Sent as multi-row VALUES pages, built once."""
    stmt = insert_for(dialect, _ACKS)
    return stmt.on_conflict_do_update(
        index_elements=["key"], set_={"at": stmt.excluded.at}, where=_acks.at < bindparam("cutoff")
    ).returning(_acks.key)


def release(connection: Connection, keys: list[str], at: datetime) -> None:
    """Undo this batch's claims of ``keys`` (their acknowledgement was not published)."""
    connection.execute(delete(AckSent).where(_acks.key.in_(keys), _acks.at == utc(at)))
