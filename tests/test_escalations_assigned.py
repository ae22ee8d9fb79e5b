"""Issue 16 with issue 15: a message escalated to an agent (``escalate_to = agent:<id>``, say
the team lead) is that agent's assignment, as one the router routes to them is: it counts
towards their load (the query the router's capacity check runs; the rows ``customer show``
and ``directory show agent`` read), and their answer to the customer closes it. It is never an
offer: the agent ends the chain, and a timed-out offer would send the message back to the
team that missed its time. The real router, events, escalation and offer workers on the
real broker and directory (SQLite and PostgreSQL), as in tests/test_escalations.py."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.schema import AgentReplied, AssignmentAccepted, AssignmentDeclined
from ingest.topology import EVENTS
from routers import escalations, state
from routers import offers as offers_module
from routers.models import Assignment, RoutedRecord
from routers.settings import RoutingSettings
from routers.store.engine import sessionmaker
from routers.store.transactions import transactions_of
from routers.store.values import aware
from routers.timers import RETRY
from tests.test_escalations import FRIDAY, MONDAY_DUE, Desk, chain

#: billing escalates straight to the agent boss (team leads)
TO_BOSS = {"escalate_to": "agent:boss"}


@asynccontextmanager
async def opened(bus: Bus, db: AsyncEngine, routing: RoutingSettings) -> AsyncIterator[Desk]:
    await chain(db, **TO_BOSS)
    desk = Desk(bus, db, routing)
    await desk.start()
    try:
        yield desk
    finally:
        await desk.close()


async def assignments(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with sessionmaker(engine)() as session:
        rows = (await session.execute(select(Assignment.__table__))).mappings().all()
    return [dict(r) for r in rows]


async def loads(engine: AsyncEngine, agents: list[str], at: datetime) -> dict[tuple[str, str], int]:
    """Open assignments as the router's capacity check counts them at ``at``."""
    since = at - RoutingSettings().load_window
    return await transactions_of(engine)(lambda c: state.open_loads(c, agents, since))


async def reply(desk: Desk, agent_id: str, at: datetime, event_id: str) -> None:
    await desk.bus.publish(
        EVENTS,
        "agent.replied",
        AgentReplied(agent_id=agent_id, customer_id="acme", channel="email", at=at),
        message_id=event_id,
    )
    await desk.events.idle()


async def test_an_escalation_to_an_agent_is_their_load_until_they_answer(
    bus: Bus, db: AsyncEngine
) -> None:
    """billing misses its time: boss has the message, not as an offer (although email has
    offers), counted in their load; nothing re-routes it from boss; boss's answer closes it."""
    routing = RoutingSettings(default_region="TR", offer_timeout={"email": timedelta(minutes=1)})
    async with opened(bus, db, routing) as desk:
        message = await desk.send()
        _, first = await desk.routed()
        assert first.route.routing_key == "team.billing"
        assert await assignments(db) == [], "a team's message is nobody's load"

        fired_at = MONDAY_DUE + timedelta(seconds=5)
        assert await desk.fire_at(fired_at) == 1
        got, routed = await desk.routed()
        assert (got, routed.route.routing_key, routed.route.attempt) == (
            f"{message.id}#2",
            "agent.boss",
            2,
        )
        await desk.breached()
        (row,) = await assignments(db)
        assert {k: row[k] for k in ("message_id", "agent_id", "customer_id", "channel")} == {
            "message_id": message.id,
            "agent_id": "boss",
            "customer_id": "acme",
            "channel": "email",
        }
        assert (row["attempt"], row["offer_due_at"], row["closed_at"], row["message"]) == (
            2,
            None,
            None,
            None,
        )
        assert aware(row["assigned_at"]) == fired_at
        assert await loads(db, ["boss"], fired_at) == {("boss", "email"): 1}

        offers = desk.offer_timers(lambda: fired_at + timedelta(hours=1))
        assert await offers.drain() == 0, "boss's assignment is no offer: it never times out"

        await reply(desk, "boss", fired_at + timedelta(minutes=2), "ev-boss")
        (row,) = await assignments(db)
        assert row["closed_at"] is not None
        assert await loads(db, ["boss"], fired_at) == {}
        await desk.nothing_more()


async def test_the_same_step_fired_twice_leaves_one_assignment(bus: Bus, db: AsyncEngine) -> None:
    """A worker that took the message and finished after ``RETRY``, when another instance
    had fired it already (same ``<id>#2``): one assignment, the first firing's, and once
    boss answered it stays closed."""
    async with opened(bus, db, RoutingSettings(default_region="TR")) as desk:
        message = await desk.send()
        await desk.routed()
        taken_at = MONDAY_DUE + timedelta(seconds=1)
        taken = await transactions_of(db)(lambda c: escalations._take_due(c, taken_at, 10))
        assert [d.message.id for d in taken] == [message.id]
        slow = await desk.escalations._steps(taken, taken_at)

        fired_at = taken_at + RETRY + timedelta(seconds=1)
        assert await desk.fire_at(fired_at) == 1, "the other instance, after RETRY"
        got, _ = await desk.routed()
        assert got == f"{message.id}#2"
        await desk.breached()
        (first,) = await assignments(db)

        late = transactions_of(db)
        await late(lambda c: escalations._fired(c, slow, taken_at))  # the slow worker ends
        assert await assignments(db) == [first]
        assert (first["agent_id"], first["attempt"], first["closed_at"]) == ("boss", 2, None)
        assert await loads(db, ["boss"], fired_at) == {("boss", "email"): 1}

        await reply(desk, "boss", fired_at + timedelta(minutes=2), "ev-boss")
        await late(lambda c: escalations._fired(c, slow, taken_at))  # and once more
        (row,) = await assignments(db)
        assert row["closed_at"] is not None, "a step fired again does not reopen it"
        assert await loads(db, ["boss"], fired_at) == {}


async def test_a_message_escalated_from_an_agent_becomes_the_escalated_agents(
    bus: Bus, db: AsyncEngine
) -> None:
    """Ana's message (last agent; billing's clock) escalates to boss: a message has one
    assignment, which is now boss's at attempt 2. Ana's load no longer counts it, and her
    later answer does not close boss's."""
    async with opened(bus, db, RoutingSettings(default_region="TR")) as desk:
        await reply(desk, "ana", FRIDAY, "ev-ana-before")
        desk.clock.at = FRIDAY + timedelta(seconds=1)
        message = await desk.send()
        got, routed = await desk.routed()
        assert (got, routed.route.routing_key) == (message.id, "agent.ana")
        (row,) = await assignments(db)
        assert (row["agent_id"], row["attempt"]) == ("ana", 1)

        fired_at = MONDAY_DUE + timedelta(seconds=5)
        assert await desk.fire_at(fired_at) == 1
        got, routed = await desk.routed()
        assert (got, routed.route.routing_key) == (f"{message.id}#2", "agent.boss")
        assert routed.route.previous is not None
        assert routed.route.previous.target == "ana"
        await desk.breached()
        (row,) = await assignments(db)
        assert (row["agent_id"], row["attempt"], row["closed_at"]) == ("boss", 2, None)
        assert await loads(db, ["ana", "boss"], fired_at) == {("boss", "email"): 1}

        await reply(desk, "ana", fired_at + timedelta(minutes=1), "ev-ana-after")
        assert await loads(db, ["ana", "boss"], fired_at) == {("boss", "email"): 1}
        await reply(desk, "boss", fired_at + timedelta(minutes=2), "ev-boss")
        assert await loads(db, ["ana", "boss"], fired_at) == {}
        await desk.nothing_more()


async def test_an_offer_timer_finishing_after_the_escalation_leaves_it_the_leads(
    bus: Bus, db: AsyncEngine
) -> None:
    """The narrow race: Ana accepted her offer, so billing's clock escalates the message;
    while the escalation worker is at it, she declines (the offer opens again) and the
    offer timer routes it again too, both as ``<id>#2``. Whichever commits last, the
    message stays boss's: the offer timer ends only rows of an earlier attempt."""
    routing = RoutingSettings(default_region="TR", offer_timeout={"email": timedelta(minutes=1)})
    async with opened(bus, db, routing) as desk:
        await reply(desk, "ana", FRIDAY, "ev-ana-before")
        desk.clock.at = FRIDAY + timedelta(seconds=1)
        message = await desk.send()
        got, routed = await desk.routed()
        assert (got, routed.route.routing_key) == (message.id, "agent.ana")
        await event(desk, AssignmentAccepted(message_id=message.id, agent_id="ana", at=FRIDAY))

        taken_at = MONDAY_DUE + timedelta(seconds=1)
        run = transactions_of(db)
        escalating = await run(lambda c: escalations._take_due(c, taken_at, 10))
        assert [d.message.id for d in escalating] == [message.id]
        steps = await desk.escalations._steps(escalating, taken_at)

        declined = AssignmentDeclined(message_id=message.id, agent_id="ana", at=taken_at)
        await event(desk, declined)
        offers = desk.offer_timers(lambda: taken_at)
        pruned = taken_at - timedelta(days=routing.routed_log_days)
        offered = await run(lambda c: offers_module._take_due(c, taken_at, 10, pruned))
        assert [d.message.id for d in offered] == [message.id]
        rerouted = await offers._reroute(offered)
        assert [r.route.attempt for r in rerouted] == [2]

        await run(lambda c: escalations._fired(c, steps, taken_at))
        await run(lambda c: offers_module._fired(c, rerouted, taken_at))  # the late one

        (row,) = await assignments(db)
        assert (row["agent_id"], row["attempt"], row["closed_at"]) == ("boss", 2, None)
        async with sessionmaker(db)() as session:
            record = (
                await session.execute(
                    select(RoutedRecord.route_target, RoutedRecord.attempt).where(
                        RoutedRecord.id == message.id
                    )
                )
            ).one()
        assert tuple(record) == ("boss", 2), "the record names the route boss has"


async def event(desk: Desk, happened: AssignmentAccepted | AssignmentDeclined) -> None:
    await desk.bus.publish(
        EVENTS, happened.type, happened, message_id=f"ev-{happened.type}-{happened.at}"
    )
    await desk.events.idle()
