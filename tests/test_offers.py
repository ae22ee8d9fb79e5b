"""Issue 16, offers: a message routed to an agent is an offer that times out or is declined
and goes on to the team (``route.attempt`` 2, ``previous`` the agent, AMQP ``message_id``
``<id>#2``), or is accepted and stays. The real router, events worker and timer worker on
the real broker and directory; the timer's clock is set ahead instead of waiting."""

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.health import Health
from ingest.schema import (
    AgentReplied,
    AgentStatus,
    AssignmentAccepted,
    AssignmentClosed,
    AssignmentDeclined,
    Attachment,
    Identity,
    InboundMessage,
    RoutedMessage,
    utcnow,
)
from ingest.topology import DEAD_QUEUE, EVENTS, INBOUND, REASON_HEADER, ROUTED_QUEUE
from routers.decider import DirectoryDecider
from routers.events import EventsWorker
from routers.models import RoutedRecord
from routers.offers import RETRY, OfferTimers
from routers.settings import RouterSettings, RoutingSettings
from routers.store.engine import create_engine, migrate, sessionmaker
from routers.worker import RouterWorker
from tests.seed import seed
from tests.support.broker import Taken, take

OFFER = timedelta(seconds=60)


class Later:
    """The timer worker's clock, ``ahead`` of the real one."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.ahead


class Desk:
    """Router, events worker and timer worker sharing one directory and vhost."""

    def __init__(self, bus: Bus, engine: AsyncEngine, routing: RoutingSettings) -> None:
        self.bus = bus
        self.health = Health()
        self.clock = Later()
        decider = DirectoryDecider(engine, routing)
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
        self.timers_engine = engine
        self.timers = OfferTimers(
            bus=bus,
            engine=engine,
            decider=decider,
            routing=routing,
            health=self.health,
            clock=self.clock,
        )
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, *, timers: bool = False) -> None:
        runs = [self.router.run(self.stop, drain_timeout=5), self.events.run(self.stop)]
        if timers:
            self.router.on_offer = self.events.on_due = self.timers.nudge
            runs.append(self.timers.run(self.stop))
        self.tasks = [asyncio.create_task(run) for run in runs]
        await self.router.idle()
        await self.events.idle()

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*self.tasks)

    async def event(self, event: AgentReplied | AssignmentAccepted | AssignmentDeclined) -> None:
        await self.bus.publish(EVENTS, event.type, event, message_id=f"ev-{id(event)}")
        await self.events.idle()

    async def send(self, **more: Any) -> InboundMessage:
        message = InboundMessage(
            channel="email",
            external_id=f"<{utcnow().timestamp()}@acme.test>",
            sender=Identity(kind="email", address="ayse@acme.test"),
            **{"text": "Faturam nerede?", **more},
        )
        await self.bus.publish(INBOUND, message.channel, message, message_id=message.id)
        await self.router.idle()
        return message

    async def routed(self, timeout: float = 10.0) -> tuple[Taken, RoutedMessage]:
        (got,) = await take(self.bus, ROUTED_QUEUE, 1, timeout)
        return got, got.model(RoutedMessage)


@pytest.fixture
async def desk(bus: Bus, db: AsyncEngine) -> AsyncIterator[Desk]:
    """Ana answered Acme; email offers last a minute (the timer's clock is moved instead).
    On SQLite and on PostgreSQL (FOR UPDATE SKIP LOCKED)."""
    await seed(db)
    routing = RoutingSettings(default_region="TR", offer_timeout={"email": OFFER})
    d = Desk(bus, db, routing)
    await d.start()
    await d.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
    yield d
    await d.close()


async def offered(desk: Desk, **more: Any) -> InboundMessage:
    message = await desk.send(**more)
    got, routed = await desk.routed()
    assert (got.message_id, routed.route.routing_key) == (message.id, "agent.ana")
    assert (routed.route.attempt, routed.route.previous) == (1, None)
    return message


async def test_an_offer_not_accepted_in_time_goes_to_the_team(desk: Desk) -> None:
    message = await offered(desk)
    assert await desk.timers.drain() == 0, "not due yet"
    desk.clock.ahead = OFFER + timedelta(seconds=1)
    assert await desk.timers.drain() == 1
    got, routed = await desk.routed()
    assert got.message_id == f"{message.id}#2"
    assert routed.message.id == message.id
    route = routed.route
    assert (route.routing_key, route.reason, route.attempt) == ("team.billing", "offer_timeout", 2)
    assert route.previous is not None
    assert (route.previous.kind, route.previous.target, route.previous.reason) == (
        "agent",
        "ana",
        "last_agent",
    )
    assert route.steps[-1] == "offer: ana did not accept it in time, routed again"
    desk.clock.ahead = OFFER + RETRY * 2  # past the time a worker holds what it took
    assert await desk.timers.drain() == 0, "fired once, and closed"


async def test_a_declined_offer_goes_to_the_team_at_once(desk: Desk) -> None:
    message = await offered(desk)
    await desk.event(AssignmentDeclined(message_id=message.id, agent_id="ana", reason="on a call"))
    assert await desk.timers.drain() == 1, "due at once, with the real clock"
    got, routed = await desk.routed()
    assert got.message_id == f"{message.id}#2"
    assert (routed.route.routing_key, routed.route.reason) == ("team.billing", "declined")
    desk.clock.ahead = OFFER * 2
    assert await desk.timers.drain() == 0


async def test_an_accepted_offer_stays_with_the_agent(desk: Desk) -> None:
    message = await offered(desk)
    await desk.event(AssignmentAccepted(message_id=message.id, agent_id="ana"))
    desk.clock.ahead = OFFER * 2
    assert await desk.timers.drain() == 0
    with pytest.raises(TimeoutError):
        await desk.routed(timeout=0)


async def test_the_agents_answer_accepts_the_offer(desk: Desk) -> None:
    await offered(desk)
    await desk.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
    desk.clock.ahead = OFFER * 2
    assert await desk.timers.drain() == 0


async def test_channels_without_an_offer_timeout_make_no_offers(
    bus: Bus, engine: AsyncEngine
) -> None:
    """Off by default: today's consumers see no change."""
    await seed(engine)
    d = Desk(bus, engine, RoutingSettings(default_region="TR"))
    await d.start()
    try:
        await d.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
        await offered(d)
        d.clock.ahead = timedelta(days=1)
        assert await d.timers.drain() == 0
    finally:
        await d.close()


async def test_the_running_timer_fires_when_the_offer_is_due(bus: Bus, engine: AsyncEngine) -> None:
    """The worker sleeps until the due time (nudged by the router that wrote it) and fires
    then, with the real clock."""
    await seed(engine)
    routing = RoutingSettings(default_region="TR", offer_timeout={"email": timedelta(seconds=1)})
    d = Desk(bus, engine, routing)
    await d.start(timers=True)
    try:
        await d.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
        message = await offered(d)
        sent = utcnow()
        got, routed = await d.routed(timeout=10)
        late = utcnow() - sent
        assert got.message_id == f"{message.id}#2"
        assert routed.route.reason == "offer_timeout"
        # not before the offer's second is up, and long before the 30 s the worker sleeps
        # when nothing is due: it slept until this due time, woken by the router's nudge
        assert timedelta(seconds=0.5) < late < timedelta(seconds=10), late
    finally:
        await d.close()


async def test_a_message_routed_again_keeps_its_whole_text_and_attachments(desk: Desk) -> None:
    """The routed record keeps a short copy; the offer keeps the message the agent got."""
    long = "Fatura " * 1000
    attachment = Attachment(filename="fatura.pdf", content_type="application/pdf", size=3)
    message = await offered(desk, text=long, attachments=[attachment])
    desk.clock.ahead = OFFER * 2
    assert await desk.timers.drain() == 1
    _, routed = await desk.routed()
    assert routed.message.text == long
    assert [a.filename for a in routed.message.attachments] == ["fatura.pdf"]
    assert routed.message.id == message.id


async def test_a_decline_without_an_offer_changes_nothing(bus: Bus, engine: AsyncEngine) -> None:
    """Offers off: a decline is not a way to move a message (README: off until configured)."""
    await seed(engine)
    d = Desk(bus, engine, RoutingSettings(default_region="TR"))
    await d.start()
    try:
        await d.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
        message = await offered(d)
        await d.event(AssignmentDeclined(message_id=message.id, agent_id="ana"))
        assert await d.timers.drain() == 0
    finally:
        await d.close()


async def test_an_offer_whose_record_was_pruned_is_closed_not_retried(desk: Desk) -> None:
    """The routed record is kept routing.routed_log_days: an offer outliving it ends,
    and the worker does not find it due again and again."""
    message = await offered(desk)
    async with sessionmaker(desk.timers_engine).begin() as session:
        await session.execute(delete(RoutedRecord).where(RoutedRecord.id == message.id))
    desk.clock.ahead = OFFER * 2
    assert await desk.timers.drain() == 0
    assert await desk.timers._until_next() == desk.timers._max_sleep


async def test_an_absence_until_year_9999_is_refused(desk: Desk) -> None:
    """A hostile or mistaken ``until`` would pin the agent away for ever (and past year
    9999 east of UTC, break every decision naming them): dead-lettered, routing goes on."""
    far = datetime(9999, 12, 31, 23, 59, tzinfo=UTC)
    await desk.bus.publish(
        EVENTS,
        "agent.status",
        AgentStatus(agent_id="ana", status="away", until=far),
        message_id="ev-far",
    )
    await desk.events.idle()
    (dead,) = await take(desk.bus, DEAD_QUEUE, 1)
    assert str(dead.headers[REASON_HEADER]).startswith("future_timestamp: until more than 366")
    await offered(desk)  # Ana is still available: the last agent takes it


async def test_a_closed_assignment_is_no_offer_any_more(desk: Desk) -> None:
    """``assignment.closed`` through the events worker: no load, and no timer left."""
    message = await offered(desk)
    await desk.event(AssignmentClosed(message_id=message.id, agent_id="ana"))
    desk.clock.ahead = OFFER * 2
    assert await desk.timers.drain() == 0
    assert await desk.timers._until_next() == desk.timers._max_sleep


async def test_a_decline_in_another_process_wakes_the_timer_worker_on_postgresql(
    bus: Bus, pg_url: str
) -> None:
    """No in-process nudge (as when the events worker runs in another instance): the
    decline's NOTIFY wakes the timer worker, asleep for up to 30 s, within a second."""
    await migrate(pg_url)
    pg_engine = create_engine(pg_url)
    await seed(pg_engine)
    d = Desk(bus, pg_engine, RoutingSettings(default_region="TR", offer_timeout={"email": OFFER}))
    await d.start()
    stop = asyncio.Event()
    worker = asyncio.create_task(d.timers.run(stop))
    try:
        await d.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
        message = await offered(d)
        await asyncio.sleep(0.5)  # the worker is asleep now, until the offer's due time
        started = asyncio.get_running_loop().time()
        await d.event(AssignmentDeclined(message_id=message.id, agent_id="ana"))
        got, routed = await d.routed(timeout=5)
        assert (got.message_id, routed.route.reason) == (f"{message.id}#2", "declined")
        assert asyncio.get_running_loop().time() - started < 2
    finally:
        stop.set()
        await worker
        await d.close()
        await pg_engine.dispose()
