"""The batch consumer against the real RabbitMQ: every message settled exactly once, the
outcome of each message its own, acks never ahead of the handler."""

import asyncio
import random
from collections.abc import Sequence

import aiormq
import pytest

from ingest.batch_consumer import BatchConsumer
from ingest.bus import Bus
from ingest.consumers import Needs
from ingest.delivery import Delivery
from ingest.errors import PoisonError, TransientError
from ingest.health import Health
from ingest.settings import BusSettings
from ingest.topology import DEAD_QUEUE, INBOUND, REASON_HEADER, ROUTER_QUEUE
from tests.support.broker import depth, opened_bus, rabbitmqctl, take
from tests.support.waiting import until


async def _publish(bus: Bus, bodies: list[bytes]) -> None:
    for start in range(0, len(bodies), 200):
        await asyncio.gather(
            *(
                bus.publish_body(INBOUND, "email", body, message_id=body.decode(), type_=None)
                for body in bodies[start : start + 200]
            )
        )


async def _depths(bus: Bus) -> tuple[int, int]:
    """(messages in omniroute.router, in omniroute.dead), from the broker."""
    return await depth(bus, ROUTER_QUEUE), await depth(bus, DEAD_QUEUE)


async def _consume(bus: Bus, handler: object, *, prefetch: int) -> BatchConsumer:
    channel = await bus.channel(prefetch)
    queue = await channel.get_queue(ROUTER_QUEUE)
    needs = Needs(bus, bus.settings, bus.health, bus.metrics)
    consumer = BatchConsumer(needs, channel, queue, handler, max_batch=prefetch // 2)  # type: ignore[arg-type]
    await consumer.start()
    return consumer


async def test_batches_finishing_out_of_order_settle_every_message_once(bus: Bus) -> None:
    """Two batches run at once and finish in any order; each message is handled once and
    acked once (a second ack of a delivery tag would close the channel and redeliver)."""
    n = 3000
    await _publish(bus, [f"m{i}".encode() for i in range(n)])
    seen: list[str] = []
    sizes: list[int] = []
    closed = asyncio.Event()

    async def handler(batch: list[Delivery]) -> Sequence[BaseException | None]:
        sizes.append(len(batch))
        await asyncio.sleep(random.random() * 0.02)  # noqa: S311
        seen.extend(m.body.decode() for m in batch)
        return [None] * len(batch)

    consumer = await _consume(bus, handler, prefetch=64)
    consumer._channel.close_callbacks.add(lambda *_: closed.set())
    await until(lambda: len(seen) >= n, 60, f"{n} messages handled")
    closed_by_broker = closed.is_set()
    await consumer.stop(timeout=10)
    assert not closed_by_broker, "the broker closed the channel (a tag acked twice?)"
    assert len(seen) == n, "a message was handled twice"
    assert len(set(seen)) == n, "a message was lost"
    assert max(sizes) > 1, "deliveries that arrive together must form one batch"
    assert await _depths(bus) == (0, 0)


async def test_each_message_gets_its_own_outcome(bus: Bus) -> None:
    """In one batch: poison is dead-lettered with its reason, a transient failure is retried
    until it succeeds, the rest is acked; nothing is left on the queue."""
    bodies = [b"ok-1", b"poison", b"flaky", b"ok-2"]
    await _publish(bus, bodies)
    attempts: dict[str, int] = {}
    done: set[str] = set()

    async def handler(batch: list[Delivery]) -> Sequence[BaseException | None]:
        outcomes: list[BaseException | None] = []
        for message in batch:
            body = message.body.decode()
            attempts[body] = attempts.get(body, 0) + 1
            if body == "poison":
                outcomes.append(PoisonError("cannot be routed"))
            elif body == "flaky" and attempts[body] < 3:
                outcomes.append(TransientError("directory away"))
            else:
                done.add(body)
                outcomes.append(None)
        return outcomes

    settings = BusSettings(transient_retry_for=30)
    async with opened_bus(bus._url, settings=settings, health=Health()) as retrying:  # noqa: SLF001
        consumer = await _consume(retrying, handler, prefetch=10)
        await until(lambda: done == {"ok-1", "ok-2", "flaky"}, 30, "all but the poison done")
        await consumer.stop(timeout=10)
        assert attempts["flaky"] == 3
        assert attempts["poison"] == 1
        channel = await retrying.connection.channel()
        dead = await channel.get_queue(DEAD_QUEUE)
        got = await dead.get(timeout=5)
        assert got.body == b"poison"
        assert got.headers[REASON_HEADER] == "cannot be routed"
        await got.ack()
        assert await _depths(retrying) == (0, 0)


async def test_a_handler_that_raises_fails_the_whole_batch_as_one(bus: Bus) -> None:
    """An exception out of the handler is every message's outcome: a bug dead-letters the
    batch with the reason instead of stalling the queue."""
    await _publish(bus, [b"a", b"b"])

    async def handler(batch: list[Delivery]) -> Sequence[BaseException | None]:
        raise ValueError("boom")

    consumer = await _consume(bus, handler, prefetch=10)
    got = await take(bus, DEAD_QUEUE, 2, timeout=10)
    await consumer.stop(timeout=5)
    assert sorted(m.body for m in got) == [b"a", b"b"]
    assert all(str(m.headers[REASON_HEADER]) == "bug: ValueError: boom" for m in got)


async def test_a_cancelled_confirm_is_an_outage_not_poison(bus: Bus) -> None:
    """When the broker client declares a stalled connection dead it fails the confirms it
    waits for with CancelledError; the message must be retried, never dead-lettered."""
    await _publish(bus, [b"stalled"])
    attempts = 0

    async def handler(batch: list[Delivery]) -> Sequence[BaseException | None]:
        nonlocal attempts
        attempts += 1
        return [asyncio.CancelledError() if attempts == 1 else None for _ in batch]

    settings = BusSettings(transient_retry_for=30)
    async with opened_bus(bus._url, settings=settings, health=Health()) as retrying:  # noqa: SLF001
        consumer = await _consume(retrying, handler, prefetch=10)
        await until(lambda: attempts >= 2, 20, "a second attempt")
        await consumer.stop(timeout=10)
        assert await _depths(retrying) == (0, 0), "handled, acked, nothing dead-lettered"


async def test_consumes_again_after_the_broker_closes_the_connection(bus: Bus, vhost: str) -> None:
    """The consumer reads from aiormq, past aio-pika's own consumer recovery: after a
    reconnection it must consume again by itself, and what it held unacked on the dead
    connection comes back and is handled."""
    await _publish(bus, [f"before{i}".encode() for i in range(5)])
    seen: list[str] = []
    release = asyncio.Event()

    async def handler(batch: list[Delivery]) -> Sequence[BaseException | None]:
        if not release.is_set():
            seen.extend(m.body.decode() for m in batch)
            await release.wait()  # held, unacked, while the connection is closed
            return [None] * len(batch)
        seen.extend(m.body.decode() for m in batch)
        return [None] * len(batch)

    consumer = await _consume(bus, handler, prefetch=10)
    await until(lambda: len(seen) >= 1, 10)
    rabbitmqctl("close_all_connections", "-p", vhost, "test: connection closed")
    await until(lambda: not consumer.active, 10)
    release.set()
    await until(lambda: consumer.active, 30)
    await _publish(bus, [f"after{i}".encode() for i in range(5)])
    wanted = {f"before{i}" for i in range(5)} | {f"after{i}" for i in range(5)}
    await until(lambda: wanted <= set(seen) and seen.count("before0") >= 1, 30)
    await until(lambda: consumer.in_flight == 0, 10)
    await consumer.stop(timeout=10)
    assert await _depths(bus) == (0, 0), "everything handled and acked on the new channel"


async def test_consumes_again_after_the_broker_cancels_the_consumer(bus: Bus) -> None:
    """A queue deleted under the consumer cancels it (basic.cancel); once the queue is back,
    the consumer resumes by itself, and reports itself inactive meanwhile."""
    seen: list[str] = []

    async def handler(batch: list[Delivery]) -> Sequence[BaseException | None]:
        seen.extend(m.body.decode() for m in batch)
        return [None] * len(batch)

    consumer = await _consume(bus, handler, prefetch=10)
    admin = await bus.connection.channel()
    await admin.queue_delete(ROUTER_QUEUE)
    await until(lambda: not consumer.active, 10)
    await bus.declare_topology()  # the queue is declared again, as a restarted daemon would
    await until(lambda: consumer.active, 30)
    await _publish(bus, [b"back"])
    await until(lambda: seen == ["back"], 10)
    await consumer.stop(timeout=10)
    await admin.close()


async def test_a_start_that_fails_leaves_no_consumer_behind(bus: Bus) -> None:
    """A consume the broker refuses (its queue is gone) fails the start; the channel is
    closed, so nothing consumes on it once the queue is back and aio-pika could reopen it."""
    seen: list[bytes] = []

    async def handler(batch: list[Delivery]) -> Sequence[BaseException | None]:
        seen.extend(m.body for m in batch)
        return [None] * len(batch)

    channel = await bus.connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.get_queue(ROUTER_QUEUE)
    admin = await bus.connection.channel()
    await admin.queue_delete(ROUTER_QUEUE)
    consumer = BatchConsumer(Needs(bus, bus.settings), channel, queue, handler, max_batch=8)
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
        await consumer.start()
    await bus.declare_topology()
    await _publish(bus, [b"after"])
    await asyncio.sleep(2)
    assert not consumer.active
    assert seen == []
    assert await _depths(bus) == (1, 0), "the message waits for a real consumer"
    await admin.close()
