"""A worker's consuming life on one queue: attach, report up, run until told to stop, drain.

The router, the dispatcher and the events worker each call one of these with the bus they
publish on and the health they report to; the consumers themselves
(``ingest.consumers``, ``ingest.batch_consumer``) are given only what they need.
"""

import asyncio
from typing import Any

from ingest.batch_consumer import BatchConsumer, BatchHandler
from ingest.bus import Bus
from ingest.consumers import Consumer, Handler, Needs, QueueConsumer
from ingest.health import Health
from ingest.metrics import Metrics


async def consumer(
    bus: Bus,
    queue_name: str,
    handler: Handler,
    *,
    prefetch: int,
    health: Health | None = None,
    metrics: Metrics | None = None,
) -> Consumer:
    """A per-message consumer on a channel of its own; ``start()`` it to take deliveries."""
    channel = await bus.channel(prefetch)
    queue = await channel.get_queue(queue_name, ensure=True)
    return Consumer(Needs(bus, bus.settings, health, metrics), channel, queue, handler)


async def consume_until(
    bus: Bus,
    queue_name: str,
    handler: Handler,
    stop: asyncio.Event,
    *,
    prefetch: int,
    component: str,
    health: Health,
    metrics: Metrics | None,
    drain_timeout: float,
) -> None:
    """Consume until ``stop``, report ``component`` up while consuming, then let in-flight
    messages finish within ``drain_timeout``."""
    worker = await consumer(
        bus, queue_name, handler, prefetch=prefetch, health=health, metrics=metrics
    )
    await _run(worker, stop, component, health, drain_timeout)


async def consume_batches_until(
    bus: Bus,
    queue_name: str,
    handler: BatchHandler,
    stop: asyncio.Event,
    *,
    prefetch: int,
    component: str,
    health: Health,
    metrics: Metrics | None,
    drain_timeout: float,
) -> None:
    """``consume_until`` for a handler of many messages at once (``BatchConsumer``): two
    batches of up to half the prefetch window each run at a time."""
    channel = await bus.channel(prefetch)
    queue = await channel.get_queue(queue_name, ensure=True)
    worker = BatchConsumer(
        Needs(bus, bus.settings, health, metrics),
        channel,
        queue,
        handler,
        max_batch=max(1, prefetch // 2),
        concurrency=2,
    )
    await _run(worker, stop, component, health, drain_timeout)


async def _run(
    worker: QueueConsumer[Any],
    stop: asyncio.Event,
    component: str,
    health: Health,
    drain_timeout: float,
) -> None:
    await worker.start()
    health.set(component, "up")
    try:
        await stop.wait()
    finally:
        health.set(component, "stopped", "draining")
        await asyncio.shield(worker.stop(drain_timeout))
