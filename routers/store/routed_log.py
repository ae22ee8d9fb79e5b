"""The bounded record of routed messages: a compact copy of each (no body beyond its start,
no attachment content), kept ``routing.routed_log_days`` (``routers.store.maintenance``).

It answers three questions: has this channel id been routed already (the router's claim,
so a redelivered message is not routed twice), which message does a reply name (the
dispatcher), and whom did a customer reach lately (the recent contacts the policy reads).
"""

import functools
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, Insert, Select, String, and_, bindparam, func, or_, select, true
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.schema import Channel, InboundMessage, RecentContact, Route, RoutedMessage
from routers.models import Assignment, RoutedRecord, Waiting
from routers.store.sql import insert_for, insert_new
from routers.store.values import aware, strip_brackets, utc


def claim_routed_many(
    connection: Connection,
    batch: list[RoutedMessage],
    offers: Mapping[Channel, timedelta] | None = None,
) -> list[str]:
    """Claim many messages' channel ids: each row is inserted unless its channel id is
    recorded (a copy later in the batch loses to an earlier one, as it would one statement
    later). The insert returns the rows it wrote; only the channel ids it did not write (a
    copy, a redelivery) are looked up. One unit of work (``routers.store.transactions``),
    committed by the caller."""
    if not batch:
        return []
    written = connection.execute(
        _claim_insert(connection.dialect.name), [_routed_row(r) for r in batch]
    )
    owners = {(r.channel, r.external_id): r.id for r in written}
    # a message newly routed to an agent is theirs until they answer (issue 15: load);
    # a copy or a redelivery found its claim and adds nothing
    assigned = [
        _assignment_row(routed, (offers or {}).get(routed.message.channel))
        for routed in batch
        if routed.route.kind == "agent"
        and owners.get((routed.message.channel, routed.message.external_id)) == routed.message.id
    ]
    if assigned:
        connection.execute(_assignment_insert(connection.dialect.name), assigned)
    # a message with a first-response time waits for an answer (issue 16: escalation)
    waiting = [
        row
        for routed in batch
        if routed.route.respond_by is not None
        and owners.get((routed.message.channel, routed.message.external_id)) == routed.message.id
        and (row := _waiting_row(routed)) is not None
    ]
    if waiting:
        connection.execute(_waiting_insert(connection.dialect.name), waiting)
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


def _assignment_row(routed: RoutedMessage, offer: timedelta | None) -> dict[str, Any]:
    """The agent's assignment; with ``offer`` (``routing.offer_timeout`` of its channel),
    also an offer that the timer worker ends at its due time unless it is accepted."""
    at = utc(routed.route.decided_at)
    return {
        "message_id": routed.message.id,
        "agent_id": routed.route.target,
        "customer_id": routed.customer.id if routed.customer else None,
        "channel": routed.message.channel,
        "assigned_at": at,
        "closed_at": None,
        "offer_due_at": at + offer if offer else None,
        "accepted_at": None,
        "outcome": None,
        "attempt": routed.route.attempt,
        "message": routed.message.model_dump_json() if offer else None,
    }


def assign_escalated(connection: Connection, moved: list[RoutedMessage]) -> None:
    """The assignment of each message escalated to an agent (``routers.escalations``): the
    router's row, without an offer (the agent ends the chain: a timed-out offer would send
    the message back to the team that missed its time). A message has one assignment, so
    the row replaces one of an earlier attempt (the agent it was routed to before no longer
    has it); the same attempt again (a step fired twice, ``routers.timers.RETRY``) writes
    nothing, as the router's claim does for a redelivery."""
    rows = [_assignment_row(r, None) for r in moved if r.route.kind == "agent"]
    if rows:
        connection.execute(_reassignment_insert(connection.dialect.name), rows)


def clock_team(route: Route) -> str | None:
    """The team whose first-response clock runs for a route: its team, or its agent's."""
    if route.kind == "team":
        return route.target
    return route.fallback_team if route.kind == "agent" else None


def _waiting_row(routed: RoutedMessage) -> dict[str, Any] | None:
    """The message's wait for a first answer, escalated at ``route.respond_by``."""
    team = clock_team(routed.route)
    if team is None or routed.route.respond_by is None:
        return None
    return {
        "message_id": routed.message.id,
        "customer_id": routed.customer.id if routed.customer else None,
        "team_id": team,
        "channel": routed.message.channel,
        "received_at": utc(routed.route.decided_at),
        "due_at": utc(routed.route.respond_by),
        "level": 0,
        "answered_at": None,
        "message": routed.message.model_dump_json(),
    }


def recent_contacts(
    connection: Connection, customer_ids: list[str], limit: int
) -> dict[str, list[RecentContact]]:
    """The recent contacts of many customers in one query (a window per customer), newest
    first."""
    rows = connection.execute(
        _recent(connection.dialect.name), {"ids": customer_ids, "limit": limit}
    )
    found: dict[str, list[RecentContact]] = {}
    for r in rows:
        found.setdefault(r.customer_id, []).append(
            RecentContact(
                channel=r.channel,
                at=aware(r.routed_at),
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


# The statements, built once.
_record = RoutedRecord.__table__.c
_RECENT_COLUMNS = (
    _record.customer_id,
    _record.channel,
    _record.routed_at,
    _record.id,
    _record.route_kind,
    _record.route_target,
)


@functools.cache
def _recent(dialect: str) -> Select[Any]:
    """Each customer's ``limit`` newest routed records.

    On PostgreSQL one index range scan per customer, newest first, stopping at ``limit``:
    the cost stays that of ``limit`` rows however long a customer's history grows. The
    window query it replaces read every record of the customers and was estimated so large
    that the planner started parallel workers for it, whose start alone (about 25 ms) cost
    more than the read; the router slowed with every round of the routed log (issue 18).
    SQLite has no LATERAL; it reads the window in-process, without that start cost."""
    if dialect == "postgresql":
        wanted = (
            func.unnest(bindparam("ids", type_=postgresql.ARRAY(String)))
            .table_valued("id")
            .render_derived(name="wanted")
        )
        newest = (
            select(*_RECENT_COLUMNS)
            .where(_record.customer_id == wanted.c.id)
            .order_by(_record.routed_at.desc())
            .limit(bindparam("limit"))
            .lateral("newest")
        )
        return (
            select(newest)
            .select_from(wanted)
            .join(newest, true())
            .order_by(newest.c.customer_id, newest.c.routed_at.desc())
        )
    ranked = (
        select(
            *_RECENT_COLUMNS,
            func.row_number()
            .over(partition_by=_record.customer_id, order_by=_record.routed_at.desc())
            .label("rank"),
        )
        .where(_record.customer_id.in_(bindparam("ids", expanding=True)))
        .subquery()
    )
    return (
        select(ranked)
        .where(ranked.c.rank <= bindparam("limit"))
        .order_by(ranked.c.customer_id, ranked.c.rank)
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


@functools.cache
def _waiting_insert(dialect: str) -> Insert:
    stmt: Insert = insert_for(dialect, Waiting.__table__)  # type: ignore[arg-type]
    return stmt.on_conflict_do_nothing(index_elements=["message_id"])  # type: ignore[attr-defined, no-any-return]


@functools.cache
def _assignment_insert(dialect: str) -> Insert:
    stmt: Insert = insert_for(dialect, Assignment.__table__)  # type: ignore[arg-type]
    return stmt.on_conflict_do_nothing(index_elements=["message_id"])  # type: ignore[attr-defined, no-any-return]


@functools.cache
def _reassignment_insert(dialect: str) -> Insert:
    """``_assignment_insert``, but a row of a later attempt takes the message's place."""
    stmt: Any = insert_for(dialect, Assignment.__table__)  # type: ignore[arg-type]
    table = Assignment.__table__.c
    return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
        index_elements=["message_id"],
        set_={c.name: stmt.excluded[c.name] for c in table if c.name != "message_id"},
        where=table.attempt < stmt.excluded.attempt,
    )
