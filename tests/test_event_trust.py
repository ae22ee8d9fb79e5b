"""Events and reply requests are checked, not believed (issue 13): a date far ahead, an agent
or customer the directory does not have, or a publisher outside events.trusted_publishers
ends in omniroute.dead with its reason instead of steering routing state, and the work
behind it flows. Real RabbitMQ; the directory on SQLite and on PostgreSQL."""

from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from config.components import Wiring
from config.settings import Settings
from ingest.amqp import broker_user
from ingest.bus import Bus
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import (
    AgentReplied,
    AgentStatus,
    Identity,
    OutboundSent,
    ReplyRequest,
    utcnow,
)
from ingest.topology import (
    DEAD_QUEUE,
    EVENTS,
    EVENTS_QUEUE,
    OUTBOUND,
    OUTBOUND_QUEUE,
    REASON_HEADER,
)
from routers import state
from routers.dispatcher import OutboundDispatcher
from routers.events import EventsWorker
from routers.models import AgentPresence, ThreadOwner
from routers.settings import DispatchSettings, EventsSettings, RouterSettings, RoutingSettings
from routers.store.engine import sessionmaker
from tests.seed import seed
from tests.support.broker import opened_bus, take
from tests.test_poison import RecordingSender, running

ROUTING = RoutingSettings(default_region="TR")
FAR = datetime(9999, 12, 31, tzinfo=UTC)
ACME_PHONE = "+905321112233"


def events_worker(bus: Bus, engine: AsyncEngine, trust: EventsSettings) -> EventsWorker:
    return EventsWorker(
        bus=bus,
        engine=engine,
        routing=ROUTING,
        settings=RouterSettings(prefetch=8),
        health=Health(),
        metrics=bus.metrics,
        trust=trust,
    )


def dispatcher(
    bus: Bus, engine: AsyncEngine, sender: RecordingSender, trust: EventsSettings
) -> OutboundDispatcher:
    return OutboundDispatcher(
        bus=bus,
        engine=engine,
        senders={"sms": sender},
        routing=ROUTING,
        settings=DispatchSettings(base_delay=0.05),
        health=Health(),
        metrics=bus.metrics,
        trust=trust,
    )


async def reasons_of_dead(bus: Bus, count: int) -> dict[str, str]:
    """``count`` dead letters (message id -> reason); fewer when fewer came in 20 s."""
    dead = await take(bus, DEAD_QUEUE, count, timeout=20, partial=True)
    return {str(d.message_id): str((d.headers or {}).get(REASON_HEADER)) for d in dead}


async def settled(bus: Bus, *queues: str) -> None:
    """After the workers stopped: nothing left unprocessed, nothing more dead-lettered."""
    for queue in (*queues, DEAD_QUEUE):
        assert (await bus.queue_depth(queue))[0] == 0, queue


async def presence(engine: AsyncEngine, agent_id: str) -> str | None:
    async with sessionmaker(engine)() as session:
        status: str | None = await session.scalar(
            select(AgentPresence.status).where(AgentPresence.agent_id == agent_id)
        )
    return status


async def last_agent(engine: AsyncEngine, customer_id: str) -> str | None:
    async with sessionmaker(engine)() as session:
        last = await state.last_agent(session, customer_id)
    return None if last is None else last.agent_id


async def publish(bus: Bus, event: AgentReplied | AgentStatus | OutboundSent, key: str) -> None:
    await bus.publish(EVENTS, event.type, event, message_id=key)


async def test_events_dated_past_the_clock_skew_are_dead_lettered_and_pin_nothing(
    db: AsyncEngine, amqp_url: str
) -> None:
    """A wrong clock in a ticket system must not pin a customer or an absence for ever."""
    await seed(db)
    metrics = Metrics()
    async with opened_bus(amqp_url, name="trust-test", metrics=metrics) as bus:
        worker = events_worker(bus, db, EventsSettings())
        async with running(worker.run):
            soon = utcnow() + timedelta(minutes=2)  # inside the default 5 min
            far: dict[str, AgentReplied | AgentStatus | OutboundSent] = {
                "replied-9999": AgentReplied(
                    agent_id="ana", customer_id="acme", channel="email", at=FAR
                ),
                "status-9999": AgentStatus(agent_id="ana", status="away", at=FAR),
                "status-hour": AgentStatus(
                    agent_id="ana", status="offline", at=utcnow() + timedelta(hours=1)
                ),
                "sent-9999": OutboundSent(request_id="r", channel="sms", agent_id="ana", at=FAR),
            }
            for key, event in far.items():
                await publish(bus, event, key)
            await publish(bus, AgentStatus(agent_id="bob", status="away", at=soon), "bob-soon")
            dead = await reasons_of_dead(bus, len(far))
            await worker.idle()
            assert await presence(db, "bob") == "away", "an event inside the skew is believed"
        await settled(bus, EVENTS_QUEUE)
        text = metrics.render().decode()
    assert set(dead) == set(far), dead
    assert all(r.startswith("future_timestamp: ") for r in dead.values()), dead
    assert "9999-12-31" in dead["replied-9999"]
    assert await last_agent(db, "acme") is None
    assert await presence(db, "ana") is None
    assert f'omniroute_dead_lettered_total{{queue="{EVENTS_QUEUE}"}} 4.0' in text


async def test_events_naming_an_unknown_agent_or_no_customer_are_dead_lettered(
    db: AsyncEngine, amqp_url: str
) -> None:
    """Only agents and customers of the directory become routing state."""
    await seed(db)
    stranger = Identity(kind="email", address="nobody@nowhere.test")
    refused: dict[str, tuple[AgentReplied | AgentStatus, str]] = {
        "replied-nobody": (
            AgentReplied(agent_id="nobody", customer_id="acme", channel="email"),
            "unknown_agent",
        ),
        "status-nobody": (AgentStatus(agent_id="nobody", status="away"), "unknown_agent"),
        "replied-bare": (AgentReplied(agent_id="ana", channel="sms"), "unknown_customer"),
        "replied-stranger": (
            AgentReplied(agent_id="ana", identity=stranger, channel="email"),
            "unknown_customer",
        ),
        "replied-phantom": (
            AgentReplied(agent_id="ana", customer_id="no-such-customer", channel="sms"),
            "unknown_customer",
        ),
    }
    async with opened_bus(amqp_url, name="trust-test", metrics=Metrics()) as bus:
        worker = events_worker(bus, db, EventsSettings())
        async with running(worker.run):
            for key, (event, _) in refused.items():
                await publish(bus, event, key)
            # a stranger's address with omniroute's Message-ID still names a thread: kept
            thread = AgentReplied(
                agent_id="bob", identity=stranger, channel="email", message_id="<r9@omni>"
            )
            await publish(bus, thread, "replied-thread")
            await publish(
                bus,
                AgentReplied(
                    agent_id="bob",
                    identity=Identity(kind="phone", address="0532 111 22 33"),
                    channel="sms",
                ),
                "replied-acme",
            )
            dead = await reasons_of_dead(bus, len(refused))
            await worker.idle()
            assert await last_agent(db, "acme") == "bob"
        await settled(bus, EVENTS_QUEUE)
    assert {k: r.split(":")[0] for k, r in dead.items()} == {
        k: code for k, (_, code) in refused.items()
    }
    assert "'nobody'" in dead["replied-nobody"]
    assert "nobody@nowhere.test" not in dead["replied-stranger"]  # no identity in the reason
    assert await presence(db, "nobody") is None
    async with sessionmaker(db)() as session:
        owner = await session.get(ThreadOwner, "r9@omni")
    assert owner is not None
    assert owner.agent_id == "bob"


async def test_a_reply_request_from_an_unknown_agent_is_not_sent(
    db: AsyncEngine, amqp_url: str
) -> None:
    """Agent ``nobody`` neither speaks to a customer nor becomes their last agent; the
    ticket system hears outbound.failed with the reason."""
    await seed(db)
    sender = RecordingSender()
    to = Identity(kind="phone", address=ACME_PHONE)
    metrics = Metrics()
    async with opened_bus(amqp_url, name="trust-test", metrics=metrics) as bus:
        outcomes = await bus.connection.channel()
        heard = await outcomes.declare_queue(exclusive=True)
        await heard.bind(EVENTS, "outbound.*")
        worker = dispatcher(bus, db, sender, EventsSettings())
        async with running(worker.run):
            bad = ReplyRequest(id="r-nobody", channel="sms", agent_id="nobody", to=to, text="hi")
            good = ReplyRequest(id="r-ana", channel="sms", agent_id="ana", to=to, text="hello")
            await bus.publish(OUTBOUND, "sms", bad, message_id=bad.id)
            await bus.publish(OUTBOUND, "sms", good, message_id=good.id)
            dead = await reasons_of_dead(bus, 1)
            said = await take(bus, heard.name, 2, timeout=20, partial=True)
        await settled(bus, OUTBOUND_QUEUE)
        await outcomes.close()
        text = metrics.render().decode()
    assert list(dead) == ["r-nobody"]
    assert dead["r-nobody"].startswith("unknown_agent: ")
    assert sender.sent == ["r-ana"]
    assert await last_agent(db, "acme") == "ana"
    kinds = sorted((m.routing_key, m.message_id) for m in said)
    assert kinds == [("outbound.failed", "failed:r-nobody"), ("outbound.sent", "sent:r-ana")]
    failed = next(m for m in said if m.routing_key == "outbound.failed")
    assert b"unknown_agent" in failed.body
    assert f'omniroute_dead_lettered_total{{queue="{OUTBOUND_QUEUE}"}} 1.0' in text


async def test_with_trusted_publishers_a_message_without_user_id_is_dead_lettered(
    db: AsyncEngine, amqp_url: str
) -> None:
    """Once publishers are listed, an event or request nobody vouches for is not read;
    omniroute's own messages carry its broker user and stay trusted (outbound.sent from the
    dispatcher is consumed by the events worker without a dead letter)."""
    await seed(db)
    sender = RecordingSender()
    trust = EventsSettings(trusted_publishers=["tickets"])  # omniroute itself is guest here
    to = Identity(kind="phone", address=ACME_PHONE)
    async with opened_bus(amqp_url, name="trust-test", metrics=Metrics()) as bus:
        assert bus.user == "guest"
        events, replies = events_worker(bus, db, trust), dispatcher(bus, db, sender, trust)
        raw = await bus.connection.channel()
        heard = await raw.declare_queue(exclusive=True)
        await heard.bind(EVENTS, "outbound.*")
        async with running(events.run, replies.run):
            anonymous = {
                "status-anon": (EVENTS, AgentStatus(agent_id="bob", status="away")),
                "reply-anon": (
                    OUTBOUND,
                    ReplyRequest(id="r-anon", channel="sms", agent_id="ana", to=to, text="x"),
                ),
            }
            for key, (exchange, model) in anonymous.items():
                target = await raw.get_exchange(exchange)
                body = model.model_dump_json().encode()
                await target.publish(aio_pika.Message(body, message_id=key), routing_key="x")
            # omniroute's own user: stamped by the Bus, trusted
            mine = ReplyRequest(id="r-mine", channel="sms", agent_id="ana", to=to, text="y")
            await bus.publish(OUTBOUND, "sms", mine, message_id=mine.id)
            dead = await reasons_of_dead(bus, len(anonymous))
            # the dispatcher's outbound.sent reached omniroute.events, and its events worker
            (sent,) = await take(bus, heard.name, 1, timeout=20)
            await events.idle()
        await settled(bus, EVENTS_QUEUE, OUTBOUND_QUEUE)
        await raw.close()
    refused = "untrusted_publisher: no user_id property: not in events.trusted_publishers"
    assert dead == {"status-anon": refused, "reply-anon": refused}
    assert (sent.routing_key, sent.user_id) == ("outbound.sent", "guest")
    assert sender.sent == ["r-mine"]
    assert await presence(db, "bob") is None


async def test_omniroute_stamps_its_broker_user_on_what_it_publishes(bus: Bus) -> None:
    """The broker checks user_id, so readers can tell omniroute's messages from others'."""
    channel = await bus.connection.channel()
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(EVENTS, "#")
    await publish(bus, AgentStatus(agent_id="ana", status="away"), "stamped")
    (got,) = await take(bus, queue.name, 1, timeout=10)
    await channel.close()
    assert got.user_id == "guest"


@pytest.mark.parametrize(
    ("url", "user"),
    [
        ("amqp://guest:guest@127.0.0.1:5672/", "guest"),
        ("amqp://omni%40ops:pw@rabbit.example/omniroute", "omni@ops"),
        ("amqp://rabbit.example/", "guest"),  # aiormq logs in as guest by default
        ("amqps://rabbit.example/?auth=external", None),  # the certificate names the user
    ],
)
def test_broker_user_is_the_user_the_connection_logs_in_as(url: str, user: str | None) -> None:
    assert broker_user(url) == user


def test_events_settings_refuse_a_negative_skew_and_empty_names() -> None:
    with pytest.raises(ValueError, match="negative"):
        EventsSettings(max_clock_skew=timedelta(seconds=-1))
    with pytest.raises(ValueError, match="broker user name"):
        EventsSettings(trusted_publishers=[""])
    assert EventsSettings.model_validate({"max_clock_skew": "PT10M"}).max_clock_skew == (
        timedelta(minutes=10)
    )


async def test_the_daemon_wires_events_settings_and_a_reload_replaces_them(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    """Revoking a ticket system's trust must not wait for a restart."""
    settings = Settings(
        state_dir=tmp_path,
        components=["events", "dispatcher"],
        events=EventsSettings(trusted_publishers=["tickets"]),
    )
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus)
    wiring = Wiring(settings, Health(), bus, engine, Metrics())
    wiring.plan()
    assert wiring.events is not None
    assert wiring.dispatcher is not None
    assert wiring.events.trust.trusted_publishers == ["tickets"]
    assert wiring.dispatcher.trust.trusted_publishers == ["tickets"]
    revoked = settings.model_copy(
        update={"events": EventsSettings(trusted_publishers=["tickets-2"])}
    )
    await wiring.reload(revoked)
    assert wiring.events.trust.trusted_publishers == ["tickets-2"]
    assert wiring.dispatcher.trust.trusted_publishers == ["tickets-2"]
    await wiring.close()
