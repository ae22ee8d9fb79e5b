"""The bus keeps DESIGN.md's reliability rules against the real RabbitMQ."""

import asyncio
import json

import aio_pika
import pytest
from pydantic import BaseModel, field_serializer

from ingest import consume
from ingest.bus import Bus
from ingest.errors import UnroutableError
from ingest.schema import Identity, InboundMessage
from ingest.settings import BusSettings
from ingest.topology import DEAD_QUEUE, INBOUND, REASON_HEADER, ROUTER_QUEUE
from tests.support.broker import rabbitmqctl, take
from tests.support.waiting import until


def _msg() -> InboundMessage:
    return InboundMessage(
        channel="email", external_id="<a@b>", sender=Identity(kind="email", address="a@b.c")
    )


async def test_topology_is_idempotent_and_as_designed(amqp_url: str, vhost: str) -> None:
    """Every start declares the topology again; a second declare must not fail, and the
    queues are quorum queues that dead-letter with a delivery limit (DESIGN.md)."""
    for _ in range(2):
        b = Bus(amqp_url, BusSettings(delivery_limit=7))
        await b.open()
        await b.close()
    listed = await asyncio.to_thread(
        rabbitmqctl, "list_queues", "-p", vhost, "name", "arguments", "--formatter", "json"
    )
    # rabbitmqctl lists each argument as [name, type, value]
    queues = {q["name"]: {a[0]: a[-1] for a in q["arguments"]} for q in json.loads(listed)}
    assert set(queues) == {
        "omniroute.router",
        "omniroute.routed",
        "omniroute.outbound",
        "omniroute.events",
        "omniroute.dead",
    }
    for name, args in queues.items():
        assert args["x-queue-type"] == "quorum"
        if name != "omniroute.dead":
            assert args["x-dead-letter-exchange"] == "omniroute.dead"
            assert args["x-delivery-limit"] == 7


async def test_published_message_is_persistent_json_with_contract_properties(bus: Bus) -> None:
    """Consumers rely on message_id, type, content type and persistence (DESIGN.md)."""
    m = _msg()
    await bus.publish(INBOUND, "email", m, message_id=m.id)
    queue = await bus.connection.channel()
    q = await queue.get_queue(ROUTER_QUEUE)
    got = await q.get(timeout=5)
    assert got is not None
    assert got.message_id == m.id
    assert got.type == "omniroute.inbound.v1"
    assert got.content_type == "application/json"
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert InboundMessage.model_validate_json(got.body) == m
    await got.ack()


async def test_unroutable_publish_is_an_error_not_a_silent_drop(bus: Bus) -> None:
    """A basic.return must surface: otherwise a message vanishes with a 'success'."""
    channel = await bus.connection.channel()
    q = await channel.get_queue(ROUTER_QUEUE)
    await q.unbind(INBOUND, "#")
    with pytest.raises(UnroutableError):
        await bus.publish(INBOUND, "email", _msg(), message_id="x")


async def test_poison_goes_to_dead_with_reason_and_consumer_keeps_going(bus: Bus) -> None:
    """Garbage must never block the queue: it lands in omniroute.dead with its reason."""
    seen: list[str] = []

    async def handler(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seen.append(InboundMessage.model_validate_json(message.body).id)

    consumer = await consume.consumer(bus, ROUTER_QUEUE, handler, prefetch=10)
    await consumer.start()
    await bus.publish_body(INBOUND, "email", b"{not json", message_id="bad", type_=None)
    good = _msg()
    await bus.publish(INBOUND, "email", good, message_id=good.id)
    [got] = await take(bus, DEAD_QUEUE, 1)
    assert got.body == b"{not json"
    assert str(got.headers[REASON_HEADER]).startswith("invalid JSON")
    await until(lambda: good.id in seen, 10, "the good message behind it handled")
    await consumer.stop(timeout=5)


def test_heartbeat_fits_two_periods_of_the_setting() -> None:
    """A stalled broker must be noticed within two bus.heartbeat periods: aiormq gives up
    after 3 * (h + 1) silent seconds, checked every max(1, h // 2), so h is asked for
    smaller; below 4 s no heartbeat can keep the promise, and the setting is refused."""
    from pydantic import ValidationError

    from ingest.amqp import amqp_heartbeat, with_heartbeat

    for window in range(4, 601):
        h = amqp_heartbeat(window)
        assert h >= 1
        assert 3 * (h + 1) + max(1, h // 2) <= 2 * window
    for refused in (1, 2, 3):
        with pytest.raises(ValidationError, match="at least 4"):
            BusSettings(heartbeat=refused)
    assert BusSettings(heartbeat=0).heartbeat == 0
    assert "heartbeat=7" in with_heartbeat("amqp://u:p@h/", 15)
    assert "heartbeat=30" in with_heartbeat("amqp://u:p@h/?heartbeat=30", 15), "operator wins"


async def test_publish_many_fails_only_the_item_that_cannot_be_serialised(bus: Bus) -> None:
    """One bad model in a batch is that item's error (a bug of ours), never its
    neighbours': they are published and confirmed."""

    class Broken(BaseModel):
        value: str

        @field_serializer("value")
        def _explode(self, value: str) -> str:
            raise ValueError("cannot serialise")

    good = _msg()
    outcomes = await bus.publish_many(
        INBOUND, [("email", good, good.id), ("email", Broken(value="x"), "broken")]
    )
    assert outcomes[0] is None
    assert isinstance(outcomes[1], Exception)
    channel = await bus.connection.channel()
    queue = await channel.get_queue(ROUTER_QUEUE)
    got = await queue.get(timeout=5)
    assert got is not None
    assert got.message_id == good.id
    await got.ack()
    assert await queue.get(fail=False) is None
    await channel.close()


async def test_bus_sink_submits_a_batch_with_the_channel_as_routing_key(bus: Bus) -> None:
    """The email intake's batch publish: every message confirmed (None), on
    ``omniroute.inbound`` under its channel, with its id and type, in order."""
    from ingest.sink import BusSink

    messages = [_msg() for _ in range(3)]
    assert await BusSink(bus).submit_many(messages) == [None, None, None]
    channel = await bus.connection.channel()
    queue = await channel.get_queue(ROUTER_QUEUE)
    for message in messages:
        got = await queue.get(timeout=5)
        assert got is not None
        assert (got.message_id, got.routing_key) == (message.id, "email")
        assert got.type == "omniroute.inbound.v1"
        assert InboundMessage.model_validate_json(got.body) == message
        await got.ack()
    assert await queue.get(fail=False) is None
    await channel.close()
