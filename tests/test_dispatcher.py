"""The outbound dispatcher sends each reply request once, records who answered whom, and
reports the outcome on omniroute.events."""

import asyncio
import json

from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.errors import PermanentSendError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.protocols import ReplyContext, SendResult
from ingest.schema import Identity, ReplyRequest
from ingest.topology import EVENTS_QUEUE, OUTBOUND
from routers import state
from routers.dispatcher import OutboundDispatcher
from routers.settings import DispatchSettings, RoutingSettings
from routers.store.engine import sessionmaker
from tests.seed import seed
from tests.support.broker import take


class SlowSms:
    """The SMS channel as the dispatcher sees it: slow enough for copies to overlap."""

    channel = "sms"

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        await asyncio.sleep(0.5)
        if reply.to.address == "+15005550001":
            raise PermanentSendError("invalid number")
        self.sent.append(reply.id)
        return SendResult(external_id=f"SM-{reply.id}")


async def test_copies_in_flight_send_once_and_teach_last_agent(
    bus: Bus, engine: AsyncEngine
) -> None:
    await seed(engine)
    sms = SlowSms()
    metrics = Metrics()
    dispatcher = OutboundDispatcher(
        bus=bus,
        engine=engine,
        senders={"sms": sms},
        routing=RoutingSettings(default_region="TR"),
        settings=DispatchSettings(),
        health=Health(),
        metrics=metrics,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop, drain_timeout=5))
    try:
        reply = ReplyRequest(
            id="r-1",
            channel="sms",
            agent_id="bob",
            to=Identity(kind="phone", address="0532 111 22 33"),
            text="Merhaba",
        )
        bad = reply.model_copy(
            update={"id": "r-2", "to": Identity(kind="phone", address="+15005550001")}
        )
        await asyncio.gather(
            bus.publish(OUTBOUND, "sms", reply, message_id=reply.id),
            bus.publish(OUTBOUND, "sms", reply, message_id=reply.id),
            bus.publish(OUTBOUND, "sms", bad, message_id=bad.id),
        )
        events = [got.json() for got in await take(bus, EVENTS_QUEUE, 3, timeout=15)]
    finally:
        stop.set()
        await task
    assert sms.sent == ["r-1"], "a request id is sent once, however often it arrives"
    text = metrics.render().decode()
    assert 'omniroute_outbound_total{channel="sms",result="sent"} 1.0' in text
    assert 'omniroute_outbound_total{channel="sms",result="failed"} 1.0' in text
    kinds = sorted((e["type"], e["request_id"]) for e in events)
    assert kinds == [("outbound.failed", "r-2"), ("outbound.sent", "r-1"), ("outbound.sent", "r-1")]
    async with sessionmaker(engine)() as session:
        last = await state.last_agent(session, "acme")
    assert last is not None
    assert last.agent_id == "bob"


async def test_an_unreadable_request_is_answered_with_outbound_failed(
    bus: Bus, engine: AsyncEngine
) -> None:
    """A ticket system waiting on its request id hears back even when the request was bad."""
    dispatcher = OutboundDispatcher(
        bus=bus,
        engine=engine,
        senders={},
        routing=RoutingSettings(),
        settings=DispatchSettings(),
        health=Health(),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop, drain_timeout=5))
    try:
        body = json.dumps({"id": "r-bad", "channel": "fax", "agent_id": "ana"}).encode()
        await bus.publish_body(OUTBOUND, "fax", body, message_id="r-bad", type_=None)
        (taken,) = await take(bus, EVENTS_QUEUE, 1, timeout=15)
        event = taken.json()
    finally:
        stop.set()
        await task
    assert event["type"] == "outbound.failed"
    assert event["request_id"] == "r-bad"
    assert "invalid reply request" in str(event["reason"])
    assert (await bus.queue_depth("omniroute.dead"))[0] == 1
