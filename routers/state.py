"""Routing state: last agent per customer, thread owners, agent presence. Fed by
``agent.replied``/``agent.status`` events and by the outbound dispatcher; read by the
decider, together with the recent contacts of the routed log (``routers.store.routed_log``).

Writes are idempotent and order-safe: an event older than what is stored never
overwrites it, so redelivered or reordered events cannot move a customer backwards.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.schema import RecentContact, utcnow
from routers.models import Agent, AgentPresence, Assignment, LastAgent, ThreadOwner, Waiting
from routers.store.routed_log import recent_contacts
from routers.store.sql import upsert
from routers.store.values import aware, strip_brackets, utc
from routers.wake import notify


@dataclass(frozen=True)
class LastContact:
    agent_id: str
    channel: str
    at: datetime


async def last_agent(session: AsyncSession, customer_id: str) -> LastContact | None:
    row = await session.get(LastAgent, customer_id)
    return None if row is None else LastContact(row.agent_id, row.channel, aware(row.at))


@dataclass(frozen=True)
class Presence:
    """An agent's last ``agent.status``; an agent who never sent one is available."""

    status: str = "available"
    #: away or offline until then (None: until the next event); past: back at work
    until: datetime | None = None
    #: who stands in meanwhile, before agents.csv's deputy
    deputy: str | None = None


AVAILABLE = Presence()


@dataclass
class RoutingState:
    """The state a batch's decisions read besides the directory."""

    #: customer id -> their last agent (absent: nobody answered)
    last: dict[str, LastContact] = field(default_factory=dict)
    #: customer id -> their recent contacts, newest first
    recent: dict[str, list[RecentContact]] = field(default_factory=dict)
    #: message index -> the agent owning the thread it answers
    owners: dict[int, str] = field(default_factory=dict)
    #: agent id -> presence, for those agents and their deputies (absent: ``AVAILABLE``)
    presence: dict[str, Presence] = field(default_factory=dict)
    #: agent id -> who stands in for them (the presence event's, else agents.csv's)
    deputies: dict[str, str] = field(default_factory=dict)
    #: (agent id, channel) -> open assignments, for agents with a capacity (absent: 0)
    loads: dict[tuple[str, str], int] = field(default_factory=dict)


def read_routing_state(
    connection: Connection,
    customer_ids: list[str],
    recent_limit: int,
    threads: dict[int, list[str]],
    load_since: datetime,
) -> RoutingState:
    """All of a batch's routing state in one unit of work (``routers.store.transactions``):
    the last agents of ``customer_ids``, their ``recent_limit`` recent contacts, the owner
    of each thread in ``threads`` (message index -> the Message-IDs it answers), and of
    every agent found and their deputies: presence, deputy and open load since
    ``load_since``."""
    found = RoutingState()
    for index, refs in threads.items():  # replies to ours: rare beside new messages
        owner = _thread_owner(connection, refs)
        if owner is not None:
            found.owners[index] = owner
    if customer_ids:
        found.last = {
            r.customer_id: LastContact(r.agent_id, r.channel, aware(r.at))
            for r in connection.execute(_LAST_AGENTS, {"ids": customer_ids})
        }
        if recent_limit > 0:
            found.recent = recent_contacts(connection, customer_ids, recent_limit)
    agents = set(found.owners.values()) | {last.agent_id for last in found.last.values()}
    capped = _agent_state(connection, agents, found)
    deputies = set(found.deputies.values()) - agents
    capped |= _agent_state(connection, deputies, found)
    if capped:
        found.loads = open_loads(connection, capped, load_since)
    return found


def open_loads(
    connection: Connection,
    agent_ids: Iterable[str],
    since: datetime,
    *,
    besides: Iterable[str] = (),
) -> dict[tuple[str, str], int]:
    """(agent, channel) -> messages routed to the agent since ``since`` and not answered
    or closed, leaving out the messages ``besides`` (a batch's own redeliveries)."""
    params = {"ids": sorted(agent_ids), "since": utc(since), "besides": sorted(besides)}
    return {(r.agent_id, r.channel): int(r.open) for r in connection.execute(_LOADS, params)}


def _agent_state(connection: Connection, agent_ids: set[str], found: RoutingState) -> set[str]:
    """Read the presence and deputy of ``agent_ids`` into ``found``; the ones with a
    capacity, whose load the caller reads next."""
    if not agent_ids:
        return set()
    capped = set()
    for r in connection.execute(_AGENT_STATE, {"ids": sorted(agent_ids)}):
        if r.status is not None:
            found.presence[r.id] = Presence(
                r.status, aware(r.until) if r.until else None, r.presence_deputy
            )
        deputy = r.presence_deputy or r.deputy
        if deputy and deputy != r.id:
            found.deputies[r.id] = deputy
        if r.capacity:
            capped.add(r.id)
    return capped


def _thread_owner(connection: Connection, message_ids: list[str]) -> str | None:
    """The agent who sent the newest of these Message-IDs, if omniroute sent any of them."""
    ids = [m for m in dict.fromkeys(strip_brackets(i) for i in message_ids) if m]
    if not ids:
        return None
    owner: str | None = connection.scalar(_THREAD_OWNER, {"ids": ids[:100]})
    return owner


async def record_reply(
    session: AsyncSession,
    *,
    agent_id: str,
    customer_id: str | None,
    channel: str,
    at: datetime,
    message_id: str | None = None,
    answers: str | None = None,
) -> None:
    """Remember who answered whom: the customer's last agent, and the thread owner; the
    agent's open assignments for that customer, routed before the answer, are done, and
    the customer's messages received before it wait for a first answer no more (issue 16:
    escalation), as do ``answers``, the message replied to, and the agent's assignment of
    it (an unknown sender's: no customer to find them by)."""
    at = utc(at)
    answered = [Waiting.customer_id == customer_id] if customer_id is not None else []
    answered += [Waiting.message_id == answers] if answers else []
    if answered:
        await session.execute(
            update(Waiting)
            .where(or_(*answered), Waiting.answered_at.is_(None), Waiting.received_at <= at)
            .values(answered_at=at, due_at=None)
        )
    done = [Assignment.customer_id == customer_id] if customer_id is not None else []
    done += [Assignment.message_id == answers] if answers else []
    if done:
        await session.execute(
            update(Assignment)
            .where(
                Assignment.agent_id == agent_id,
                or_(*done),
                Assignment.closed_at.is_(None),
                Assignment.assigned_at <= at,
            )
            .values(closed_at=at, offer_due_at=None)  # an answer accepts the offer too
        )
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


async def forget_last_agent(session: AsyncSession, customer_id: str, at: datetime) -> bool:
    """A ``customer.unstick``: the customer has no last agent, unless one answered them
    after ``at`` (order-safe like every write here). False when there was none to forget."""
    result = await session.execute(
        delete(LastAgent).where(LastAgent.customer_id == customer_id, LastAgent.at <= utc(at))
    )
    return bool(getattr(result, "rowcount", 0))


async def set_presence(
    session: AsyncSession,
    agent_id: str,
    status: str,
    at: datetime,
    *,
    until: datetime | None = None,
    deputy: str | None = None,
) -> None:
    """Store an ``agent.status`` unless a later one is already stored."""
    at = utc(at)
    await upsert(
        session,
        AgentPresence.__table__,  # type: ignore[arg-type]
        [
            {
                "agent_id": agent_id,
                "status": status,
                "at": at,
                "until": utc(until) if until else None,
                "deputy": deputy,
            }
        ],
        ["agent_id"],
        where=lambda excluded: AgentPresence.__table__.c.at <= excluded.at,
    )


async def accept_offer(session: AsyncSession, message_id: str, agent_id: str, at: datetime) -> bool:
    """``assignment.accepted``: the offer's timer stops; the message stays the agent's load
    until they answer. False when no open offer of that message was the agent's."""
    result = await session.execute(
        update(Assignment)
        .where(
            Assignment.message_id == message_id,
            Assignment.agent_id == agent_id,
            Assignment.outcome.is_(None),
            Assignment.accepted_at.is_(None),
        )
        .values(accepted_at=utc(at), offer_due_at=None)
    )
    return bool(getattr(result, "rowcount", 0))


async def decline_offer(
    session: AsyncSession, message_id: str, agent_id: str, at: datetime
) -> bool:
    """``assignment.declined``: the offer is due at once (the timer worker routes the message
    again without the agent) and is no load of theirs any more. Also after an acceptance
    (the agent gives it back); not once the message was routed on."""
    at = min(utc(at), utcnow())  # a publisher's clock ahead must not delay the re-route
    result = await session.execute(
        update(Assignment)
        .where(
            Assignment.message_id == message_id,
            Assignment.agent_id == agent_id,
            Assignment.outcome.is_(None),
            Assignment.closed_at.is_(None),
            # an offer, open or accepted: not a message on a channel without offers
            or_(Assignment.offer_due_at.is_not(None), Assignment.accepted_at.is_not(None)),
        )
        .values(
            outcome="declined",
            offer_due_at=at,
            accepted_at=None,
            closed_at=func.coalesce(Assignment.closed_at, at),
        )
    )
    declined = bool(getattr(result, "rowcount", 0))
    if declined:  # due now: wake the timer workers of every instance (PostgreSQL)
        await session.run_sync(lambda s: notify(s.connection()))
    return declined


async def close_assignment(
    session: AsyncSession, message_id: str, agent_id: str, at: datetime
) -> bool:
    """An ``assignment.closed``: the message no longer counts towards the agent's load.
    False when there was no open assignment of that message to that agent."""
    result = await session.execute(
        update(Assignment)
        .where(
            Assignment.message_id == message_id,
            Assignment.agent_id == agent_id,
            Assignment.closed_at.is_(None),
        )
        .values(closed_at=utc(at), offer_due_at=None)
    )
    return bool(getattr(result, "rowcount", 0))


# The decider's statements, built once.
_last, _presence = LastAgent.__table__.c, AgentPresence.__table__.c
_agent, _assigned = Agent.__table__.c, Assignment.__table__.c
_LAST_AGENTS = select(_last.customer_id, _last.agent_id, _last.channel, _last.at).where(
    _last.customer_id.in_(bindparam("ids", expanding=True))
)
_THREAD_OWNER = (
    select(ThreadOwner.__table__.c.agent_id)
    .where(ThreadOwner.__table__.c.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(ThreadOwner.__table__.c.at.desc())
    .limit(1)
)
_AGENT_STATE = (
    select(
        _agent.id,
        _agent.deputy,
        _agent.capacity,
        _presence.status,
        _presence.until,
        _presence.deputy.label("presence_deputy"),
    )
    .join_from(
        Agent.__table__, AgentPresence.__table__, _presence.agent_id == _agent.id, isouter=True
    )
    .where(_agent.id.in_(bindparam("ids", expanding=True)))
)
_LOADS = (
    select(_assigned.agent_id, _assigned.channel, func.count().label("open"))
    .where(
        _assigned.agent_id.in_(bindparam("ids", expanding=True)),
        _assigned.closed_at.is_(None),
        _assigned.assigned_at > bindparam("since"),
        _assigned.message_id.not_in(bindparam("besides", expanding=True)),
    )
    .group_by(_assigned.agent_id, _assigned.channel)
)
