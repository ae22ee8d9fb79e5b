"""An agent's capacity, checked again where it is spent: in the claim's transaction.

The decider reads each agent's load before deciding, but two routers (or one router's two
batches) deciding at the same instant both see the agent one below capacity, and both send
them a message. The claim is where the message becomes the agent's (``routers.store.
routed_log`` writes the assignment), so it counts the agent's open assignments again there,
under a lock per agent on PostgreSQL (on SQLite, the database's one write lock): a message past the
capacity goes to the team it would have fallen back to, with the ``*_busy`` reason and a step
saying so, before anything is recorded or published.
"""

from collections.abc import Mapping
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, select, text, update

from ingest.schema import Channel, ReasonName, Route, RoutedMessage
from routers import state
from routers.availability import capacity_of
from routers.models import Agent
from routers.store import routed_log
from routers.wake import SOON, notify

#: the first key of omniroute's advisory locks (the second is the agent id's hash), so they
#: cannot meet another application's single-key locks on the same database
_LOCK_SPACE = 0x6F72
_LOCK = text("SELECT pg_advisory_xact_lock(:space, hashtext(:agent))")
_CAPACITIES = select(Agent.id, Agent.capacity).where(Agent.id.in_(bindparam("ids", expanding=True)))
#: the reason the policy gives when the agent of a route cannot take it (a deputy at
#: capacity falls back as the agent they stood in for would)
_BUSY: dict[str, ReasonName] = {
    "thread_owner": "thread_owner_busy",
    "last_agent": "last_agent_busy",
    "deputy": "last_agent_fallback",
}


def claim(
    connection: Connection,
    batch: list[RoutedMessage],
    load_since: datetime,
    offers: Mapping[Channel, timedelta] | None = None,
) -> list[tuple[str, RoutedMessage]]:
    """Each message's claim (the id owning its channel id) and the routed message as it is
    recorded and must be published: its agent route replaced when the agent is full. An
    agent route on a channel of ``offers`` is an offer with that timeout (issue 16)."""
    checked = within_capacity(connection, batch, load_since)
    claims = routed_log.claim_routed_many(connection, checked, offers)
    if due_soon(checked, offers or {}):
        notify(connection)  # timer workers in other processes may sleep past it otherwise
    return list(zip(claims, checked, strict=True))


def due_soon(batch: list[RoutedMessage], offers: Mapping[Channel, timedelta]) -> bool:
    """Whether the batch writes an offer or a first answer due before a sleeping timer
    worker looks again (``SOON``): a short ``offer_timeout`` or ``first_response``."""
    for routed in batch:
        route, channel = routed.route, routed.message.channel
        soon = route.decided_at + SOON
        if route.respond_by is not None and route.respond_by <= soon:
            return True
        offer = offers.get(channel) if route.kind == "agent" else None
        if offer is not None and offer <= SOON:
            return True
    return False


def within_capacity(
    connection: Connection, batch: list[RoutedMessage], load_since: datetime
) -> list[RoutedMessage]:
    """``batch`` with every agent route past the agent's capacity sent to the team."""
    agents = sorted({r.route.target for r in batch if r.route.kind == "agent" and r.route.target})
    if not agents:
        return batch
    limits = {
        row.id: found
        for row in connection.execute(_CAPACITIES, {"ids": agents})
        if (found := capacity_of(row.capacity))
    }
    if not limits:
        return batch
    if connection.dialect.name == "postgresql":
        for agent in sorted(limits):  # one order for every router: no deadlock
            connection.execute(_LOCK, {"space": _LOCK_SPACE, "agent": agent})
    else:
        # SQLite reads outside the write lock until the first write of the transaction:
        # write first (the rows as they are), so no other writer commits between the
        # count below and the claim's insert
        connection.execute(
            update(Agent).where(Agent.id.in_(sorted(limits))).values(capacity=Agent.capacity)
        )
    ids = [r.message.id for r in batch]
    open_now = state.open_loads(connection, limits, load_since, besides=ids)
    checked: list[RoutedMessage] = []
    for routed in batch:
        route, channel = routed.route, routed.message.channel
        limit = limits.get(route.target or "", {}).get(channel) if route.kind == "agent" else None
        if limit is not None and route.target is not None:
            key = (route.target, channel)
            if open_now.get(key, 0) >= limit:
                routed = routed.model_copy(update={"route": _to_team(route, channel, limit)})
            else:
                open_now[key] = open_now.get(key, 0) + 1
        checked.append(routed)
    return checked


def _to_team(route: Route, channel: str, limit: int) -> Route:
    team = route.fallback_team
    step = (
        f"capacity: {route.target} reached {limit} open on {channel} meanwhile (another "
        f"router's messages), so {'team ' + team if team else 'triage'} takes it"
    )
    return route.model_copy(
        update={
            "kind": "team" if team else "triage",
            "target": team,
            "reason": _BUSY.get(route.reason, "last_agent_busy"),
            "fallback_team": None,
            "for_agent": None,
            "steps": [*route.steps, step],
        }
    )
