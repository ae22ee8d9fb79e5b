"""Routing state: last agent per customer, thread owners, agent presence. Fed by
``agent.replied``/``agent.status`` events and by the outbound dispatcher; read by the
decider, together with the recent contacts of the routed log (``routers.store.routed_log``).

Writes are idempotent and order-safe: an event older than what is stored never
overwrites it, so redelivered or reordered events cannot move a customer backwards.
"""

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.schema import RecentContact
from routers.models import AgentPresence, LastAgent, ThreadOwner
from routers.store.routed_log import recent_contacts
from routers.store.sql import upsert
from routers.store.values import aware, strip_brackets, utc


@dataclass(frozen=True)
class LastContact:
    agent_id: str
    channel: str
    at: datetime


async def last_agent(session: AsyncSession, customer_id: str) -> LastContact | None:
    row = await session.get(LastAgent, customer_id)
    return None if row is None else LastContact(row.agent_id, row.channel, aware(row.at))


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
    """All of a batch's routing state in one unit of work (``routers.store.transactions``):
    the last agents of ``customer_ids``, their ``recent_limit`` recent contacts, and the
    owner of each thread in ``threads`` (message index -> the Message-IDs it answers)."""
    found = RoutingState()
    for index, refs in threads.items():  # replies to ours: rare beside new messages
        owner = _thread_owner(connection, refs)
        if owner is not None:
            found.owners[index] = (owner, _presence_of(connection, owner))
    if customer_ids:
        found.last = _last_agents_presence(connection, customer_ids)
        if recent_limit > 0:
            found.recent = recent_contacts(connection, customer_ids, recent_limit)
    return found


def _last_agents_presence(
    connection: Connection, customer_ids: list[str]
) -> dict[str, tuple[LastContact, str]]:
    rows = connection.execute(_LAST_AGENTS, {"ids": customer_ids})
    return {
        r.customer_id: (
            LastContact(r.agent_id, r.channel, aware(r.at)),
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


# The decider's statements, built once.
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
