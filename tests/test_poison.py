"""Poison on every queue omniroute consumes: it ends in ``omniroute.dead`` and blocks nothing.

The router, events and dispatcher workers run for real over a fresh vhost and a SQLite
directory. Garbage and oversized bodies published to ``omniroute.inbound``,
``omniroute.events`` and ``omniroute.outbound`` must each land in ``omniroute.dead``
with the original body and an ``x-omniroute-reason`` header, and a valid message published
after them must still be processed. A message that fails transiently for ever (the
dispatcher's directory database is unreachable) must end in ``omniroute.dead`` through the
broker's ``x-delivery-limit`` instead of looping.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.health import Health
from ingest.protocols import ReplyContext, SendResult
from ingest.schema import AgentStatus, Identity, InboundMessage, ReplyRequest, RoutedMessage
from ingest.settings import BusSettings
from ingest.topology import DEAD_QUEUE, EVENTS, INBOUND, OUTBOUND, REASON_HEADER, ROUTED_QUEUE
from routers.decider import DirectoryDecider
from routers.dispatcher import OutboundDispatcher
from routers.events import EventsWorker
from routers.models import AgentPresence
from routers.settings import DirectorySettings, DispatchSettings, RouterSettings, RoutingSettings
from routers.store.engine import create_engine, sessionmaker
from routers.worker import RouterWorker
from tests.phone_fixtures import ACME_PHONE, REGION, seed_directory
from tests.support.broker import opened_bus, take
from tests.support.net import free_port
from tests.support.waiting import until

DELIVERY_LIMIT = 3
BIG = 4 * 1024 * 1024  # far above anything omniroute publishes itself
ROUTING = RoutingSettings(default_region=REGION, default_team="t-triage")
#: what each consumed queue is fed through: (exchange, routing key)
FEEDS = {
    "omniroute.router": (INBOUND, "sms"),
    "omniroute.events": (EVENTS, "agent.status"),
    "omniroute.outbound": (OUTBOUND, "sms"),
}


def poison_bodies() -> list[tuple[str, bytes]]:
    return [
        ("not UTF-8", b"\xff\xfe\x00\x81garbage"),
        ("not JSON", b"hello, world"),
        ("empty", b""),
        ("null", b"null"),
        ("a list", b"[1, 2, 3]"),
        ("empty object", b"{}"),
        ("wrong types", b'{"channel": "fax", "id": 7, "type": "agent.nonsense"}'),
        ("nested 100k deep", b"[" * 100_000 + b"]" * 100_000),
        ("oversized garbage", b"\x00garbage" * (BIG // 8)),
        ("oversized JSON", b'{"channel": "sms", "pad": "' + b"a" * BIG + b'"}'),
        ("truncated JSON", b'{"channel": "sms", "sender": {"kind": "phone", "addr'),
    ]


class RecordingSender:
    """An SMS sender that records what it was asked to send (a loopback Twilio is in the
    Twilio tests; here only the dispatcher's consumption matters)."""

    channel = "sms"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        self.sent.append(reply.id)
        return SendResult(external_id=f"SM-{reply.id}")


#: short in-process retries, so the delivery limit is what ends a doomed message
BUS = BusSettings(delivery_limit=DELIVERY_LIMIT, publish_timeout=10.0, transient_retry_for=0.2)


@asynccontextmanager
async def running(*runs: Callable[[asyncio.Event], Awaitable[None]]) -> AsyncIterator[None]:
    """Run workers until the block ends, then let them drain (bounded)."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(run(stop)) for run in runs]
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)


def workers(bus: Bus, engine: AsyncEngine, sender: RecordingSender) -> list[Any]:
    health = Health()
    settings = RouterSettings(prefetch=16)
    router = RouterWorker(
        bus=bus,
        engine=engine,
        decider=DirectoryDecider(engine, ROUTING),
        routing=ROUTING,
        settings=settings,
        health=health,
    )
    events = EventsWorker(bus=bus, engine=engine, routing=ROUTING, settings=settings, health=health)
    dispatcher = OutboundDispatcher(
        bus=bus,
        engine=engine,
        senders={"sms": sender},
        routing=ROUTING,
        settings=DispatchSettings(base_delay=0.05),
        health=health,
    )
    return [router.run, events.run, dispatcher.run]


async def test_garbage_and_oversized_bodies_on_every_queue_end_in_dead_and_block_nothing(
    engine: AsyncEngine, amqp_url: str, tmp_path: Path
) -> None:
    """Poison is set aside with its reason and original body; valid work behind it flows."""
    await seed_directory(engine, tmp_path)
    sender = RecordingSender()
    bodies = poison_bodies()
    async with (
        opened_bus(amqp_url, settings=BUS, name="poison-test") as bus,
        running(*workers(bus, engine, sender)),
    ):
        sent: dict[str, bytes] = {}
        for queue_name, (exchange, key) in FEEDS.items():
            for n, (_, body) in enumerate(bodies):
                message_id = f"poison-{queue_name}-{n}"
                sent[message_id] = body
                await bus.publish_body(exchange, key, body, message_id=message_id, type_="garbage")
        # valid work published behind the poison
        inbound = InboundMessage(
            channel="sms", external_id="SM-valid", sender=Identity(kind="phone", address=ACME_PHONE)
        )
        await bus.publish(INBOUND, "sms", inbound, message_id=inbound.id)
        status = AgentStatus(agent_id="a-ayse", status="away")
        await bus.publish(EVENTS, status.type, status, message_id="status-valid")
        reply = ReplyRequest(
            id="reply-valid",
            channel="sms",
            agent_id="a-ayse",
            to=Identity(kind="phone", address=ACME_PHONE),
            text="we are on it",
        )
        await bus.publish(OUTBOUND, "sms", reply, message_id=reply.id)

        dead = await take(bus, DEAD_QUEUE, len(sent), timeout=40, partial=True)
        routed = await take(bus, ROUTED_QUEUE, 1, timeout=10, partial=True)
        await until(lambda: sender.sent, 10, "the valid reply request sent")
        async with sessionmaker(engine)() as session:
            presence = await session.scalar(
                select(AgentPresence.status).where(AgentPresence.agent_id == "a-ayse")
            )

    by_id = {d.message_id: d for d in dead}
    assert set(by_id) == set(sent), sorted(set(sent) - set(by_id))
    for message_id, delivery in by_id.items():
        headers = delivery.headers or {}
        assert headers.get(REASON_HEADER), message_id
        queue_name = message_id.rsplit("-", 1)[0].removeprefix("poison-")
        exchange, key = FEEDS[queue_name]
        assert headers["x-omniroute-source"] == f"{exchange}/{key}"
        assert delivery.body == sent[message_id], message_id  # the original, untouched
    reasons = {str((d.headers or {})[REASON_HEADER]) for d in dead}
    assert any(r.startswith("invalid JSON") for r in reasons), reasons
    assert any(r.startswith("schema violation") for r in reasons), reasons
    assert not any(r.startswith("bug:") for r in reasons), reasons
    assert len(routed) == 1
    assert RoutedMessage.model_validate_json(routed[0].body).route.routing_key == "team.t-istanbul"
    assert presence == "away"
    assert sender.sent == ["reply-valid"]


async def test_a_message_that_keeps_failing_transiently_is_dead_lettered_by_delivery_limit(
    amqp_url: str,
) -> None:
    """An unreachable directory is retried, not called a bug, and never loops for ever."""
    unreachable = create_engine(
        f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere",
        DirectorySettings(statement_timeout=1.0),
    )
    sender = RecordingSender()
    try:
        async with opened_bus(amqp_url, settings=BUS, name="poison-test") as bus:
            dispatcher = OutboundDispatcher(
                bus=bus,
                engine=unreachable,
                senders={"sms": sender},
                routing=ROUTING,
                settings=DispatchSettings(),
                health=Health(),
            )
            reply = ReplyRequest(
                id="reply-doomed",
                channel="sms",
                agent_id="a-ayse",
                to=Identity(kind="phone", address=ACME_PHONE),
                text="never sent",
            )
            async with running(dispatcher.run):
                await bus.publish(OUTBOUND, "sms", reply, message_id=reply.id)
                dead = await take(bus, DEAD_QUEUE, 1, timeout=30, partial=True)
    finally:
        await unreachable.dispose()
    assert len(dead) == 1, "the message must leave the queue within the delivery limit"
    headers = dead[0].headers or {}
    assert REASON_HEADER not in headers, headers.get(REASON_HEADER)  # retried, not poison
    assert headers.get("x-first-death-reason") == "delivery_limit", headers
    assert dead[0].message_id == reply.id
    assert sender.sent == []
