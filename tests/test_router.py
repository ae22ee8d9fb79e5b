"""The router against the real RabbitMQ and a real directory: DESIGN.md's policy end to end,
learning from events, dead-lettering garbage, and never losing a message."""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.health import Health
from ingest.schema import (
    AgentReplied,
    AgentStatus,
    Identity,
    InboundMessage,
    RoutedMessage,
    Thread,
)
from ingest.topology import DEAD_QUEUE, EVENTS, INBOUND, REASON_HEADER, ROUTED_QUEUE
from routers.decider import DirectoryDecider
from routers.events import EventsWorker
from routers.settings import RouterSettings, RoutingSettings
from routers.store import routed_log
from routers.store.engine import sessionmaker
from routers.worker import RouterWorker
from tests.seed import seed
from tests.support.broker import take
from tests.support.waiting import until


class Routing:
    """The router and events workers running on a test vhost, with a reader of the routed queue."""

    def __init__(self, bus: Bus, engine: AsyncEngine, routing: RoutingSettings) -> None:
        self.bus = bus
        self.health = Health()
        self.decider = DirectoryDecider(engine, routing)
        self.router = RouterWorker(
            bus=bus,
            engine=engine,
            decider=self.decider,
            routing=routing,
            settings=RouterSettings(prefetch=32),
            health=self.health,
        )
        self.events = EventsWorker(
            bus=bus, engine=engine, routing=routing, settings=RouterSettings(), health=self.health
        )
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.router.run(self.stop, drain_timeout=5)),
            asyncio.create_task(self.events.run(self.stop, drain_timeout=5)),
        ]
        await until(lambda: not self.health.ready()[1], 10, "router and events workers up")

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*self.tasks)

    async def send(self, message: InboundMessage) -> None:
        await self.bus.publish(INBOUND, message.channel, message, message_id=message.id)

    async def event(self, event: AgentReplied | AgentStatus) -> None:
        """Publish an event and return once the events worker has handled it."""
        await self.bus.publish(EVENTS, event.type, event, message_id=f"ev-{id(event)}")
        await self.events.idle()

    async def routed(self, timeout: float = 10) -> tuple[str, RoutedMessage]:
        """The next routed message; TimeoutError when none comes within ``timeout``."""
        [got] = await take(self.bus, ROUTED_QUEUE, 1, timeout)
        return got.routing_key, got.model(RoutedMessage)


@pytest.fixture
async def routing(bus: Bus, engine: AsyncEngine) -> AsyncIterator[Routing]:
    await seed(engine)
    r = Routing(bus, engine, RoutingSettings(default_region="TR"))
    await r.start()
    yield r
    await r.close()


def email(sender: str, **kw: object) -> InboundMessage:
    return InboundMessage(
        channel="email",
        external_id=f"<{asyncio.get_running_loop().time()}@{sender}>",
        sender=Identity(kind="email", address=sender),
        subject="Modemim calismiyor",
        text="Merhaba",
        **kw,  # type: ignore[arg-type]
    )


async def test_known_customer_goes_to_team_then_last_agent_then_back(routing: Routing) -> None:
    """The issue's story: team, then the agent who answered, then the team when they leave."""
    await routing.send(email("Ayse@ACME.test"))
    key, routed = await routing.routed()
    assert (key, routed.route.reason) == ("team.billing", "dedicated_team")
    assert routed.customer is not None
    assert routed.customer.id == "acme"

    await routing.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
    await routing.event(AgentStatus(agent_id="ana", status="available"))
    await routing.send(email("ayse@acme.test"))
    key, routed = await routing.routed()
    assert (key, routed.route.reason) == ("agent.ana", "last_agent")
    assert routed.customer is not None
    assert [c.route for c in routed.customer.recent] == ["team.billing"], "recent contacts"

    await routing.event(AgentStatus(agent_id="ana", status="away"))
    await routing.send(email("ayse@acme.test"))
    key, routed = await routing.routed()
    assert (key, routed.route.reason) == ("team.billing", "last_agent_fallback")


async def test_reply_event_by_identity_teaches_the_router(routing: Routing) -> None:
    """A ticket system may know the customer only by the address it answered."""
    await routing.event(
        AgentReplied(
            agent_id="bob",
            identity=Identity(kind="phone", address="0532 111 22 33"),
            channel="sms",
        )
    )
    sms = InboundMessage(
        channel="sms", external_id="SM1", sender=Identity(kind="phone", address="+90 532 111 2233")
    )
    await routing.send(sms)
    key, routed = await routing.routed()
    assert (key, routed.route.reason) == ("agent.bob", "last_agent")


async def test_unknown_sender_goes_to_triage_not_dropped(routing: Routing) -> None:
    await routing.send(email("stranger@nowhere.test"))
    key, routed = await routing.routed()
    assert (key, routed.route.reason) == ("triage", "unknown_sender")
    assert routed.customer is None


async def test_unknown_sender_goes_to_default_team(bus: Bus, engine: AsyncEngine) -> None:
    await seed(engine)
    r = Routing(bus, engine, RoutingSettings(default_team="network"))
    await r.start()
    try:
        await r.send(email("stranger@nowhere.test"))
        key, routed = await r.routed()
        assert (key, routed.route.reason) == ("team.network", "unknown_sender")
    finally:
        await r.close()


async def test_thread_owner_wins_for_an_email_answer(routing: Routing) -> None:
    """A reply in a thread goes to whoever sent our message in that thread."""
    await routing.event(
        AgentReplied(agent_id="bob", customer_id="acme", channel="email", message_id="<r1@omni>")
    )
    await routing.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"))
    await routing.send(email("ayse@acme.test", thread=Thread(in_reply_to="<r1@omni>")))
    key, routed = await routing.routed()
    assert (key, routed.route.reason) == ("agent.bob", "thread_owner")


async def test_garbage_goes_to_dead_and_router_keeps_going(routing: Routing) -> None:
    """A poison message must not block the queue: it is parked with its reason."""
    await routing.bus.publish_body(
        INBOUND, "email", b"\xff\x00garbage", message_id="g1", type_=None
    )
    await routing.bus.publish_body(
        INBOUND, "email", json.dumps({"channel": "fax"}).encode(), message_id="g2", type_=None
    )
    await routing.send(email("ayse@acme.test"))
    key, _ = await routing.routed()
    assert key == "team.billing"
    await routing.router.idle()  # the dead-lettering was confirmed before the ack
    dead = await take(routing.bus, DEAD_QUEUE, quiet=0)
    reasons = {got.message_id: str(got.headers[REASON_HEADER]) for got in dead}
    assert sorted(got.message_id or "" for got in dead) == ["g1", "g2"]
    assert reasons["g1"].startswith("invalid JSON")
    assert reasons["g2"].startswith("schema violation")


async def test_duplicate_channel_id_is_routed_once(routing: Routing) -> None:
    """Re-polls and retries publish the same channel id again; it is routed once."""
    first = email("ayse@acme.test")
    again = first.model_copy(update={"id": "another-omniroute-id"})
    await routing.send(first)
    await routing.send(again)
    await routing.routed()
    await routing.router.idle()
    assert await take(routing.bus, ROUTED_QUEUE, quiet=0) == [], "routed once"
    assert routing.router.duplicates == 1


async def test_a_claim_the_database_refuses_is_dead_lettered_not_retried(routing: Routing) -> None:
    """An omniroute id already recorded for another channel id can never be claimed: that
    message is dead-lettered with the reason, the others of its batch are routed."""
    first = email("ayse@acme.test")
    await routing.send(first)
    await routing.routed()
    clash = email("ayse@acme.test").model_copy(update={"id": first.id})  # new channel id
    fine = email("ayse@acme.test")
    await routing.send(clash)
    await routing.send(fine)
    _, routed = await routing.routed()
    assert routed.message.id == fine.id
    await routing.router.idle()
    (got,) = await take(routing.bus, DEAD_QUEUE, quiet=0)
    assert got.message_id == first.id
    assert str(got.headers[REASON_HEADER]).startswith("claim refused by the directory database")


async def test_sender_is_normalised_again_by_the_router(routing: Routing) -> None:
    """Publishers make mistakes: a national-format number still finds its customer."""
    sms = InboundMessage(
        channel="sms", external_id="SM2", sender=Identity(kind="phone", address="0532 111 22 33")
    )
    await routing.send(sms)
    key, routed = await routing.routed()
    assert key == "team.billing"
    assert routed.message.sender.address == "+905321112233"


async def test_routed_message_carries_the_contract_properties(routing: Routing) -> None:
    """Ticket systems deduplicate on message_id and dispatch on type (DESIGN.md contract)."""
    m = email("ayse@acme.test")
    await routing.send(m)
    await routing.router.idle()
    (got,) = await take(routing.bus, ROUTED_QUEUE, quiet=0)
    assert got.message_id == m.id
    assert got.message_type == "omniroute.routed.v1"
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    body = json.loads(got.body)
    assert set(body) >= {"message", "customer", "route"}
    assert set(body["route"]) >= {"kind", "target", "reason", "decided_at"}


async def test_sticky_for_expires(bus: Bus, engine: AsyncEngine) -> None:
    """After routing.sticky_for the customer goes back to the team."""
    await seed(engine)
    r = Routing(bus, engine, RoutingSettings(sticky_for=timedelta(seconds=1)))
    await r.start()
    try:
        answered = datetime.now(UTC) - timedelta(seconds=1.5)  # longer ago than sticky_for
        await r.event(
            AgentReplied(agent_id="ana", customer_id="acme", channel="email", at=answered)
        )
        await r.send(email("ayse@acme.test"))
        key, routed = await r.routed()
        assert (key, routed.route.reason) == ("team.billing", "dedicated_team")
    finally:
        await r.close()


SPOOF = {"spf": "fail", "dkim": "none", "dmarc": "fail", "authserv_id": "mx.support.test"}
PASS = {"spf": "pass", "dkim": "pass", "dmarc": "pass", "authserv_id": "mx.support.test"}


async def test_spoofed_mail_from_a_customer_goes_to_the_team_without_context(
    bus: Bus, engine: AsyncEngine
) -> None:
    """Issue 13: a mail failing DMARC names a customer in From, but neither their agent nor
    their history is handed to whoever wrote it."""
    await seed(engine)
    r = Routing(bus, engine, RoutingSettings(default_region="TR", require_authenticated_email=True))
    await r.start()
    try:
        await r.event(
            AgentReplied(agent_id="ana", customer_id="acme", channel="email", message_id="<r9@o>")
        )
        await r.event(AgentStatus(agent_id="ana", status="available"))
        await r.send(email("ayse@acme.test", meta={"auth": PASS}))
        key, routed = await r.routed()
        assert (key, routed.route.reason) == ("agent.ana", "last_agent")
        assert routed.customer is not None

        for spoof in (
            email("ayse@acme.test", meta={"auth": SPOOF}, thread=Thread(in_reply_to="<r9@o>")),
            email("ayse@acme.test"),  # no Authentication-Results from a trusted server
        ):
            await r.send(spoof)
            key, routed = await r.routed()
            assert (key, routed.route.reason) == ("team.billing", "unverified_sender")
            assert routed.customer is None, "no name, no recent contacts"
            assert any("not taken as customer acme's own" in s for s in routed.route.steps)
            async with sessionmaker(engine)() as session:
                found = await routed_log.find_routed(session, spoof.id)
            assert found is not None
            assert found[1] is None, "the routed record names no customer either"
    finally:
        await r.close()
