"""Issue 16, escalation: a customer's message nobody answered within its team's first-response
time, counted in the team's opening hours, publishes ``sla.breached`` and goes to the team's
``escalate_to`` (reason ``escalated``, ``attempt`` one more, AMQP ``message_id``
``<id>#<attempt>``), up the chain; an answer stops it. The real router, events worker and
escalation worker on the real broker and directory; the clocks are set instead of waiting."""

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.health import Health
from ingest.recent import RecentDecisions
from ingest.schema import (
    AgentReplied,
    Identity,
    InboundMessage,
    RoutedMessage,
    SlaBreached,
    utcnow,
)
from ingest.topology import EVENTS, INBOUND, ROUTED_QUEUE
from routers import escalations
from routers.decider import DirectoryDecider
from routers.escalations import EscalationTimers
from routers.events import EventsWorker
from routers.models import Agent, Team, Waiting
from routers.offers import OfferTimers
from routers.settings import RouterSettings, RoutingSettings
from routers.store.engine import create_engine, migrate, sessionmaker
from routers.store.maintenance import Pruner
from routers.store.transactions import transactions_of
from routers.timers import RETRY
from routers.worker import RouterWorker
from tests.seed import seed
from tests.support.broker import take

IST = ZoneInfo("Europe/Istanbul")
#: Friday 17:55 in Istanbul: billing (Mon-Fri 09:00-18:00, 4 h for email) is due Monday 12:55
FRIDAY = datetime(2026, 12, 4, 17, 55, tzinfo=IST)
MONDAY_DUE = datetime(2026, 12, 7, 12, 55, tzinfo=IST)
SLA_QUEUE = "test.sla"


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Desk:
    """Router, events worker and escalation worker; the decider and timers read ``clock``."""

    def __init__(self, bus: Bus, engine: AsyncEngine, routing: RoutingSettings) -> None:
        self.bus, self.engine, self.health = bus, engine, Health()
        self.clock = Clock(FRIDAY)
        decider = DirectoryDecider(engine, routing, clock=self.clock)
        self.router = RouterWorker(
            bus=bus,
            engine=engine,
            decider=decider,
            routing=routing,
            settings=RouterSettings(prefetch=16),
            health=self.health,
        )
        self.events = EventsWorker(
            bus=bus, engine=engine, routing=routing, settings=RouterSettings(), health=self.health
        )
        self.escalations = EscalationTimers(
            bus=bus,
            engine=engine,
            decider=decider,
            routing=routing,
            health=self.health,
            clock=self.clock,
        )
        self.routing = routing
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def offer_timers(self, clock: Callable[[], datetime] | None = None) -> OfferTimers:
        """An offer worker beside the escalation worker: same decider and settings, the
        desk's clock unless another is given."""
        return OfferTimers(
            bus=self.bus,
            engine=self.engine,
            decider=self.escalations._decider,
            routing=self.routing,
            health=self.health,
            clock=clock or self.clock,
        )

    async def start(self) -> None:
        async with self.bus.connection.channel() as channel:
            queue = await channel.declare_queue(SLA_QUEUE, durable=True)
            await queue.bind(EVENTS, "sla.breached")
        runs = [self.router.run(self.stop, drain_timeout=5), self.events.run(self.stop)]
        self.tasks = [asyncio.create_task(run) for run in runs]
        await self.router.idle()
        await self.events.idle()

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*self.tasks)

    async def send(self, **more: Any) -> InboundMessage:
        fields: dict[str, Any] = {
            "channel": "email",
            "external_id": f"<{utcnow().timestamp()}@acme.test>",
            "sender": Identity(kind="email", address="ayse@acme.test"),
            "text": "Faturam nerede?",
        }
        message = InboundMessage(**(fields | more))
        await self.bus.publish(INBOUND, message.channel, message, message_id=message.id)
        await self.router.idle()
        return message

    async def routed(self, timeout: float = 10.0) -> tuple[str | None, RoutedMessage]:
        (got,) = await take(self.bus, ROUTED_QUEUE, 1, timeout)
        return got.message_id, got.model(RoutedMessage)

    async def breached(self, timeout: float = 10.0) -> SlaBreached:
        (got,) = await take(self.bus, SLA_QUEUE, 1, timeout)
        assert got.message_id is not None
        assert got.message_id.startswith("sla:")
        return got.model(SlaBreached)

    async def nothing_more(self) -> None:
        for queue in (ROUTED_QUEUE, SLA_QUEUE):
            assert await take(self.bus, queue, quiet=0, timeout=5) == [], queue

    async def fire_at(self, at: datetime) -> int:
        self.clock.at = at
        return await self.escalations.drain()


async def chain(engine: AsyncEngine, **billing: Any) -> None:
    """billing (Istanbul office hours, 4 h for email) escalates to leads (always open, 1 h),
    leads to the agent boss."""
    await seed(engine)
    async with sessionmaker(engine).begin() as session:
        session.add(Team(id="leads", name="Team leads", first_response="email=1h"))
        await session.flush()
        session.add(Agent(id="boss", name="Boss", team_id="leads", active=True))
        await session.execute(
            update(Team).where(Team.id == "leads").values(escalate_to="agent:boss")
        )
        await session.execute(
            update(Team)
            .where(Team.id == "billing")
            .values(
                {
                    "timezone": "Europe/Istanbul",
                    "hours": "Mon-Fri 09:00-18:00",
                    "first_response": "email=4h;sms=15m",
                    "escalate_to": "leads",
                }
                | billing
            )
        )


@pytest.fixture
async def desk(bus: Bus, db: AsyncEngine) -> AsyncIterator[Desk]:
    await chain(db)
    d = Desk(bus, db, RoutingSettings(default_region="TR"))
    await d.start()
    yield d
    await d.close()


async def test_an_unanswered_mail_escalates_up_the_chain_in_opening_hours(desk: Desk) -> None:
    """Friday 17:55 with 4 h due is Monday 12:55 (the clock paused over the weekend); then
    leads (1 h, always open), then the agent boss, where the chain ends."""
    message = await desk.send()
    first_id, first = await desk.routed()
    assert (first_id, first.route.routing_key, first.route.reason) == (
        message.id,
        "team.billing",
        "dedicated_team",
    )
    assert first.route.respond_by == MONDAY_DUE
    assert await desk.fire_at(MONDAY_DUE - timedelta(minutes=1)) == 0, "not due yet"

    desk.escalations.recent = recent = RecentDecisions()  # the status page's record
    assert await desk.fire_at(MONDAY_DUE + timedelta(seconds=5)) == 1
    assert [(d.routing_key, d.reason, d.attempt) for d in recent.last()] == [
        ("team.leads", "escalated", 2)
    ]
    breach = await desk.breached()
    assert (breach.message_id, breach.customer_id, breach.team, breach.level) == (
        message.id,
        "acme",
        "billing",
        1,
    )
    assert (breach.due_at, breach.escalated_to) == (MONDAY_DUE, "team.leads")
    got, routed = await desk.routed()
    route = routed.route
    assert got == f"{message.id}#2"
    assert (route.routing_key, route.reason, route.attempt) == ("team.leads", "escalated", 2)
    assert route.previous is not None
    assert (route.previous.kind, route.previous.target, route.previous.reason) == (
        "team",
        "billing",
        "dedicated_team",
    )
    assert routed.customer is not None
    assert routed.customer.id == "acme"
    assert routed.message.text == "Faturam nerede?"
    level_two = MONDAY_DUE + timedelta(hours=1, seconds=5)
    assert route.respond_by == level_two

    assert await desk.fire_at(level_two + timedelta(seconds=1)) == 1
    breach = await desk.breached()
    assert (breach.team, breach.level, breach.escalated_to) == ("leads", 2, "agent.boss")
    got, routed = await desk.routed()
    assert got == f"{message.id}#3"
    assert (routed.route.routing_key, routed.route.attempt) == ("agent.boss", 3)
    assert routed.route.previous is not None
    assert routed.route.previous.target == "leads"

    assert await desk.fire_at(level_two + timedelta(days=30)) == 0, "the chain ended at boss"
    await desk.nothing_more()


async def test_an_answer_stops_every_waiting_message_of_that_customer(desk: Desk) -> None:
    first = await desk.send()
    second = await desk.send(text="Hala cevap yok")
    assert {(await desk.routed())[0], (await desk.routed())[0]} == {first.id, second.id}
    await desk.bus.publish(
        EVENTS,
        "agent.replied",
        AgentReplied(agent_id="ana", customer_id="acme", channel="email", at=FRIDAY),
        message_id="ev-1",
    )
    await desk.events.idle()
    assert await desk.fire_at(MONDAY_DUE + timedelta(days=1)) == 0
    async with sessionmaker(desk.engine)() as session:
        for message in (first, second):
            wait = await session.get(Waiting, message.id)
            assert wait is not None
            assert (wait.due_at, wait.answered_at is not None) == (None, True)
    await desk.nothing_more()


async def test_a_channel_without_a_time_or_past_max_escalations_stops(
    bus: Bus, engine: AsyncEngine
) -> None:
    """No time for twitter: nothing waits. With max_escalations 0, sla.breached is published
    and the message stays where it is."""
    await chain(engine)
    d = Desk(bus, engine, RoutingSettings(default_region="TR", max_escalations=0))
    await d.start()
    try:
        await d.send(channel="twitter", sender=Identity(kind="twitter", address="acmeltd"))
        _, routed = await d.routed()
        assert routed.route.respond_by is None
        message = await d.send()
        _, routed = await d.routed()
        assert routed.route.respond_by == MONDAY_DUE
        assert await d.fire_at(MONDAY_DUE + timedelta(seconds=1)) == 1
        breach = await d.breached()
        assert (breach.message_id, breach.level, breach.escalated_to) == (message.id, 1, None)
        assert await d.fire_at(MONDAY_DUE + timedelta(days=60)) == 0
        await d.nothing_more()
    finally:
        await d.close()


async def test_a_taken_batch_fires_again_after_retry_with_the_same_ids(desk: Desk) -> None:
    """A worker that took a batch and died before closing it: another fires it after RETRY,
    under the same message ids, so consumers deduplicate it."""
    message = await desk.send()
    await desk.routed()
    desk.clock.at = MONDAY_DUE + timedelta(seconds=1)
    # the take alone (a crash right after it): pushed RETRY ahead, nothing published
    at = desk.clock.at
    taken = await transactions_of(desk.engine)(lambda c: escalations._take_due(c, at, 10))
    assert [d.message.id for d in taken] == [message.id]
    assert await desk.escalations.drain() == 0, "held by the worker that took it"
    assert await desk.fire_at(desk.clock.at + RETRY + timedelta(seconds=1)) == 1
    breach = await desk.breached()
    assert breach.level == 1
    got, _ = await desk.routed()
    assert got == f"{message.id}#2"


async def test_an_offer_and_an_escalation_due_together_publish_two_attempts(
    bus: Bus, db: AsyncEngine
) -> None:
    """An offer to Ana and the message's first-response time both due when the timers look
    (a daemon down over both): the offer worker and the escalation worker, running side by
    side, must not both publish ``<id>#2`` with different routes (a consumer deduplicating
    on ``message_id`` would drop one of them); the escalation waits for the offer's end."""
    await chain(db)
    routing = RoutingSettings(default_region="TR", offer_timeout={"email": timedelta(minutes=1)})
    d = Desk(bus, db, routing)
    offers = d.offer_timers()
    await d.start()
    try:
        await d.bus.publish(
            EVENTS,
            "agent.replied",
            AgentReplied(agent_id="ana", customer_id="acme", channel="email", at=FRIDAY),
            message_id="ev-ana",
        )
        await d.events.idle()
        d.clock.at = FRIDAY + timedelta(seconds=1)
        message = await d.send()
        got, routed = await d.routed()
        assert (got, routed.route.routing_key) == (message.id, "agent.ana")
        assert routed.route.respond_by == MONDAY_DUE + timedelta(seconds=1)
        d.clock.at = MONDAY_DUE + timedelta(seconds=5)
        await asyncio.gather(offers.drain(), d.escalations.drain())
        await d.escalations.drain()  # the escalation deferred to the offer goes now
        published: dict[str | None, str] = {}
        for _ in range(2):
            got, routed = await d.routed()
            assert got not in published, f"{got} published twice: {published}"
            published[got] = routed.route.reason
        assert published == {f"{message.id}#2": "offer_timeout", f"{message.id}#3": "escalated"}
        await d.breached()
        await d.nothing_more()
    finally:
        await d.close()


async def test_the_pruner_keeps_the_waiting_table_bounded(desk: Desk) -> None:
    """Each wait holds the whole message (text and inline attachments): once its routed record
    is pruned (``routing.routed_log_days``) it can never escalate, and goes with it, answered
    or not, instead of staying for ever."""
    answered = await desk.send()
    await desk.routed()
    await desk.bus.publish(
        EVENTS,
        "agent.replied",
        AgentReplied(agent_id="ana", customer_id="acme", channel="email", at=FRIDAY),
        message_id="ev-1",
    )
    await desk.events.idle()
    desk.clock.at = FRIDAY + timedelta(minutes=1)
    unanswered = await desk.send(text="Hala cevap yok")
    await desk.routed()
    routing = RoutingSettings(default_region="TR")
    later = FRIDAY + timedelta(days=routing.routed_log_days, hours=1)
    assert await Pruner(desk.engine, routing, clock=lambda: later).prune_once() > 0
    async with sessionmaker(desk.engine)() as session:
        assert await session.get(Waiting, answered.id) is None
        assert await session.get(Waiting, unanswered.id) is None


async def test_the_clock_runs_from_when_omniroute_took_the_message_in(desk: Desk) -> None:
    """A mail taken in at Friday 16:55 and routed at 17:55 (held by a broker outage, say) is
    due Monday 11:55, not 12:55; a received_at in the future counts from the decision."""
    early = await desk.send(received_at=FRIDAY - timedelta(hours=1))
    _, routed = await desk.routed()
    assert routed.message.id == early.id
    assert routed.route.respond_by == MONDAY_DUE - timedelta(hours=1)
    await desk.send(received_at=FRIDAY + timedelta(days=2))
    _, routed = await desk.routed()
    assert routed.route.respond_by == MONDAY_DUE


class RealClock(Clock):
    def __call__(self) -> datetime:
        return utcnow()


async def test_a_short_first_response_wakes_a_worker_in_another_process(
    bus: Bus, pg_url: str
) -> None:
    """No in-process nudge (the escalation worker runs in another instance): the router's
    claim NOTIFYs a wait due within the worker's 30 s sleep, so it fires on time."""
    await migrate(pg_url)
    engine = create_engine(pg_url)
    try:
        await chain(engine, hours=None, first_response="email=3s")
        d = Desk(bus, engine, RoutingSettings(default_region="TR"))
        d.clock = RealClock(FRIDAY)
        d.escalations._clock = d.clock
        d.router._decider._clock = d.clock  # type: ignore[attr-defined]
        await d.start()
        stop = asyncio.Event()
        worker = asyncio.create_task(d.escalations.run(stop))
        try:
            await asyncio.sleep(0.5)  # asleep now: nothing is due
            message = await d.send()
            _, routed = await d.routed()
            assert routed.route.respond_by is not None
            breach = await d.breached(timeout=8)
            assert breach.message_id == message.id
            late = utcnow() - routed.route.respond_by
            assert late < timedelta(seconds=2), late
        finally:
            stop.set()
            await worker
            await d.close()
    finally:
        await engine.dispose()
