"""Routing state: last agent per customer, thread owners, agent presence, and the bounded
record of routed messages. Fed by ``agent.replied``/``agent.status`` events and by the
outbound dispatcher; read by the decider.

Writes are idempotent and order-safe: an event older than what is stored never
overwrites it, so redelivered or reordered events cannot move a customer backwards.
"""

import functools
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Insert, Select, and_, bindparam, delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.schema import InboundMessage, RecentContact, RoutedMessage
from routers.models import (
    AgentPresence,
    LastAgent,
    RoutedRecord,
    SeenId,
    SentReply,
    ThreadOwner,
)
from routers.sql import insert_for, insert_new, upsert


@dataclass(frozen=True)
class LastContact:
    agent_id: str
    channel: str
    at: datetime


async def last_agent(session: AsyncSession, customer_id: str) -> LastContact | None:
    row = await session.get(LastAgent, customer_id)
    return None if row is None else LastContact(row.agent_id, row.channel, _aware(row.at))


@dataclass
class RoutingState:
    """The state a batch's decisions read besides the directory."""

    #: customer id -> their last agent and that agent's presence (absent: nobody answered)
    last: dict[str, tuple[LastContact, str]] = field(default_factory=dict)
    #: customer id -> their recent contacts, newest first
    recent: dict[str, list[RecentContact]] = field(default_factory=dict)
    #: message index -> (the agent owning the thread it answers, their presence)
    owners: dict[int, tuple[str, str]] = field(default_factory=dict)


def read_routing_state(
    connection: Connection,
    customer_ids: list[str],
    recent_limit: int,
    threads: dict[int, list[str]],
) -> RoutingState:
    """All of a batch's routing state in one unit of work (``routers.runner``): the last
    agents of ``customer_ids``, their ``recent_limit`` recent contacts, and the owner of
    each thread in ``threads`` (message index -> the Message-IDs it answers)."""
    found = RoutingState()
    for index, refs in threads.items():  # replies to ours: rare beside new messages
        owner = _thread_owner(connection, refs)
        if owner is not None:
            found.owners[index] = (owner, _presence_of(connection, owner))
    if customer_ids:
        found.last = _last_agents_presence(connection, customer_ids)
        if recent_limit > 0:
            found.recent = _recent_contacts(connection, customer_ids, recent_limit)
    return found


def _last_agents_presence(
    connection: Connection, customer_ids: list[str]
) -> dict[str, tuple[LastContact, str]]:
    rows = connection.execute(_LAST_AGENTS, {"ids": customer_ids})
    return {
        r.customer_id: (
            LastContact(r.agent_id, r.channel, _aware(r.at)),
            "available" if r.status is None else str(r.status),
        )
        for r in rows
    }


def _thread_owner(connection: Connection, message_ids: list[str]) -> str | None:
    """The agent who sent the newest of these Message-IDs, if omniroute sent any of them."""
    ids = [m for m in dict.fromkeys(strip_brackets(i) for i in message_ids) if m]
    if not ids:
        return None
    owner: str | None = connection.scalar(_THREAD_OWNER, {"ids": ids[:100]})
    return owner


def _presence_of(connection: Connection, agent_id: str) -> str:
    """An agent with no status event yet counts as available: presence is opt-in."""
    status: str | None = connection.scalar(_PRESENCE, {"agent": agent_id})
    return "available" if status is None else status


async def record_reply(
    session: AsyncSession,
    *,
    agent_id: str,
    customer_id: str | None,
    channel: str,
    at: datetime,
    message_id: str | None = None,
) -> None:
    """Remember who answered whom: the customer's last agent, and the thread owner."""
    at = utc(at)
    if customer_id is not None:
        await upsert(
            session,
            LastAgent.__table__,  # type: ignore[arg-type]
            [{"customer_id": customer_id, "agent_id": agent_id, "channel": channel, "at": at}],
            ["customer_id"],
            where=lambda excluded: LastAgent.__table__.c.at <= excluded.at,
        )
    if message_id:
        await upsert(
            session,
            ThreadOwner.__table__,  # type: ignore[arg-type]
            [
                {
                    "message_id": strip_brackets(message_id)[:512],
                    "agent_id": agent_id,
                    "customer_id": customer_id,
                    "at": at,
                }
            ],
            ["message_id"],
        )


async def set_presence(session: AsyncSession, agent_id: str, status: str, at: datetime) -> None:
    at = utc(at)
    await upsert(
        session,
        AgentPresence.__table__,  # type: ignore[arg-type]
        [{"agent_id": agent_id, "status": status, "at": at}],
        ["agent_id"],
        where=lambda excluded: AgentPresence.__table__.c.at <= excluded.at,
    )


def claim_routed_many(connection: Connection, batch: list[RoutedMessage]) -> list[str]:
    """Claim many messages' channel ids: each row is inserted unless its channel id is
    recorded (a copy later in the batch loses to an earlier one, as it would one statement
    later). The insert returns the rows it wrote; only the channel ids it did not write (a
    copy, a redelivery) are looked up. One unit of work (``routers.runner``), committed by
    the caller."""
    if not batch:
        return []
    written = connection.execute(
        _claim_insert(connection.dialect.name), [_routed_row(r) for r in batch]
    )
    owners = {(r.channel, r.external_id): r.id for r in written}
    wanted: dict[str, list[str]] = {}
    for routed in batch:
        message = routed.message
        if (message.channel, message.external_id) not in owners:
            wanted.setdefault(message.channel, []).append(message.external_id)
    if wanted:
        params: dict[str, Any] = {}
        for i, (channel, ids) in enumerate(sorted(wanted.items())):
            params[f"channel{i}"], params[f"ids{i}"] = channel, ids
        rows = connection.execute(_claims_of_channels(len(wanted)), params)
        owners.update({(r.channel, r.external_id): r.id for r in rows})
    return [owners.get((r.message.channel, r.message.external_id)) or r.message.id for r in batch]


async def record_routed(session: AsyncSession, routed: RoutedMessage) -> bool:
    """Keep a compact copy (no body, no attachment content); False if already recorded."""
    return await insert_new(
        session,
        RoutedRecord.__table__,  # type: ignore[arg-type]
        _routed_row(routed),
        ["channel", "external_id"],
    )


def _routed_row(routed: RoutedMessage) -> dict[str, Any]:
    message = routed.message
    kept = message  # a compact copy: no attachment content, the text's start
    if len(message.text) > 2000 or message.attachments:
        kept = message.model_copy(update={"text": message.text[:2000], "attachments": []})
    return {
        "id": message.id,
        "channel": message.channel,
        "external_id": message.external_id,
        # the column holds 512: a longer (malformed) Message-ID is indexed by its start
        "thread_message_id": strip_brackets(message.thread.message_id)[:512]
        if message.thread and message.thread.message_id
        else None,
        "customer_id": routed.customer.id if routed.customer else None,
        "route_kind": routed.route.kind,
        "route_target": routed.route.target,
        "reason": routed.route.reason,
        "routed_at": utc(routed.route.decided_at),
        "message": kept.model_dump_json(),
    }


def _recent_contacts(
    connection: Connection, customer_ids: list[str], limit: int
) -> dict[str, list[RecentContact]]:
    """The recent contacts of many customers in one query (a window per customer)."""
    rows = connection.execute(_RECENT, {"ids": customer_ids, "limit": limit})
    found: dict[str, list[RecentContact]] = {}
    for r in rows:
        found.setdefault(r.customer_id, []).append(
            RecentContact(
                channel=r.channel,
                at=_aware(r.routed_at),
                message_id=r.id,
                route=r.route_kind
                if r.route_target is None
                else f"{r.route_kind}.{r.route_target}",
            )
        )
    return found


async def find_routed(
    session: AsyncSession, reference: str
) -> tuple[InboundMessage, str | None] | None:
    """The routed message a reply names: by omniroute id, channel id or email Message-ID."""
    ref = strip_brackets(reference)
    row = (
        await session.execute(
            select(RoutedRecord.message, RoutedRecord.customer_id)
            .where(
                or_(
                    RoutedRecord.id == reference,
                    RoutedRecord.external_id == reference,
                    RoutedRecord.external_id == ref,
                    RoutedRecord.thread_message_id == ref,
                )
            )
            .order_by(RoutedRecord.routed_at.desc())
            .limit(1)
        )
    ).first()
    if row is None:
        return None
    return InboundMessage.model_validate_json(row.message), row.customer_id


async def reply_sent(session: AsyncSession, request_id: str) -> bool:
    return (await session.get(SentReply, request_id)) is not None


async def record_sent(
    session: AsyncSession, request_id: str, channel: str, external_id: str | None, at: datetime
) -> None:
    await insert_new(
        session,
        SentReply.__table__,  # type: ignore[arg-type]
        {"id": request_id, "channel": channel, "external_id": external_id, "at": utc(at)},
        ["id"],
    )


async def prune(session: AsyncSession, now: datetime, keep: timedelta) -> int:
    """Drop routed records, sent-reply markers and seen channel ids older than ``keep``;
    returns the rows removed. Thread owners are kept: a customer may answer a year later."""
    cutoff = now - keep
    removed = 0
    for stmt in (
        delete(RoutedRecord).where(RoutedRecord.routed_at < cutoff),
        delete(SentReply).where(SentReply.at < cutoff),
        delete(SeenId).where(SeenId.at < cutoff),
    ):
        result = await session.execute(stmt)
        removed += int(getattr(result, "rowcount", 0) or 0)
    return removed


def strip_brackets(message_id: str | None) -> str:
    """RFC 5322 msg-ids compare without their angle brackets and surrounding space."""
    if not message_id:
        return ""
    return message_id.strip().removeprefix("<").removesuffix(">").strip()


def utc(value: datetime) -> datetime:
    """Store UTC only: SQLite keeps no offset, so mixed offsets would compare wrongly."""
    return value.astimezone(UTC)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes even for timezone=True columns; they are UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# The router's statements, built once (see ``routers.sql.fetch``).
_last, _presence = LastAgent.__table__.c, AgentPresence.__table__.c
_LAST_AGENTS = (
    select(_last.customer_id, _last.agent_id, _last.channel, _last.at, _presence.status)
    .join_from(
        LastAgent.__table__,
        AgentPresence.__table__,
        _presence.agent_id == _last.agent_id,
        isouter=True,
    )
    .where(_last.customer_id.in_(bindparam("ids", expanding=True)))
)

_THREAD_OWNER = (
    select(ThreadOwner.__table__.c.agent_id)
    .where(ThreadOwner.__table__.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(ThreadOwner.__table__.c.at.desc())
    .limit(1)
)
_PRESENCE = select(_presence.status).where(_presence.agent_id == bindparam("agent"))

_record = RoutedRecord.__table__.c
_ranked = (
    select(
        _record.customer_id,
        _record.channel,
        _record.routed_at,
        _record.id,
        _record.route_kind,
        _record.route_target,
        func.row_number()
        .over(partition_by=_record.customer_id, order_by=_record.routed_at.desc())
        .label("rank"),
    )
    .where(_record.customer_id.in_(bindparam("ids", expanding=True)))
    .subquery()
)
_RECENT = (
    select(_ranked)
    .where(_ranked.c.rank <= bindparam("limit"))
    .order_by(_ranked.c.customer_id, _ranked.c.rank)
)


@functools.cache
def _claims_of_channels(channels: int) -> Select[Any]:
    # one "channel = ? AND external_id IN (...)" per channel searches the unique index; a
    # row-value IN would scan the table on SQLite
    return select(_record.channel, _record.external_id, _record.id).where(
        or_(
            *(
                and_(
                    _record.channel == bindparam(f"channel{i}"),
                    _record.external_id.in_(bindparam(f"ids{i}", expanding=True)),
                )
                for i in range(channels)
            )
        )
    )


@functools.cache
def _claim_insert(dialect: str) -> Insert:
    """Insert a routed record unless its channel id is recorded; returns what it wrote
    (SQLAlchemy sends the rows as multi-row VALUES pages for that)."""
    stmt: Insert = insert_for(dialect, RoutedRecord.__table__)  # type: ignore[arg-type]
    return stmt.on_conflict_do_nothing(index_elements=["channel", "external_id"]).returning(  # type: ignore[attr-defined, no-any-return]
        _record.channel, _record.external_id, _record.id
    )
