"""A worker on one queue: ``run(stop)`` for the daemon, ``idle()`` and ``drain()`` to ask
"done?" instead of waiting a while.

The router, the dispatcher and the events worker are ``QueueWorker``s: each says which
queue it takes and which consumer handles it (``ingest.consumers.Consumer`` per message,
``ingest.batch_consumer.BatchConsumer`` per batch); the consuming life (attach, report up,
run until told to stop, let in-flight messages finish) is written once, here. The
consumers are given only what they need (``Needs``); they import neither the bus nor this.
"""

import abc
import asyncio
from typing import Any, ClassVar

from aio_pika.abc import AbstractChannel, AbstractQueue

from ingest.bus import Bus
from ingest.consumers import Consumer, Handler, Needs, QueueConsumer
from ingest.health import Health
from ingest.metrics import Metrics

#: how far apart the two looks at an idle queue are: a delivery the broker sent in between
#: shows up in the second (loopback takes microseconds; a batch starts within one loop turn)
SETTLE = 0.05


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


class QueueWorker(abc.ABC):
    """Consumes one queue of the topology with a consumer of its choosing."""

    #: the component name it reports under in ``Health`` (and logs, metrics)
    name: ClassVar[str]
    #: the queue it consumes (``ingest.topology``)
    queue: ClassVar[str]

    def __init__(
        self, bus: Bus, *, prefetch: int, health: Health, metrics: Metrics | None = None
    ) -> None:
        self._bus = bus
        self._prefetch = prefetch
        self._health = health
        self._metrics = metrics
        self._consumer: QueueConsumer[Any] | None = None
        self._consuming = asyncio.Event()

    @abc.abstractmethod
    def _consumer_for(
        self, needs: Needs, channel: AbstractChannel, queue: AbstractQueue
    ) -> QueueConsumer[Any]:
        """The consumer that hands this worker its deliveries."""

    async def run(self, stop: asyncio.Event, *, drain_timeout: float = 30.0) -> None:
        """Consume until ``stop`` is set, then let in-flight messages finish within
        ``drain_timeout`` and return."""
        channel = await self._bus.channel(self._prefetch)
        queue = await channel.get_queue(self.queue, ensure=True)
        needs = Needs(self._bus, self._bus.settings, self._health, self._metrics)
        worker = self._consumer_for(needs, channel, queue)
        await worker.start()
        self._consumer = worker
        self._consuming.set()
        self._health.set(self.name, "up")
        try:
            await stop.wait()
        finally:
            self._consuming.clear()
            self._consumer = None
            self._health.set(self.name, "stopped", "draining")
            await asyncio.shield(worker.stop(drain_timeout))

    async def idle(self, *, timeout: float = 10.0) -> int:
        """While ``run`` consumes: wait until the queue holds nothing ready and nothing taken
        is unsettled, seen twice ``SETTLE`` apart with no message finished in between.
        Returns the messages this run handled so far; TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            await self._consuming.wait()
            seen: int | None = None
            while True:
                worker = self._consumer
                if worker is None:  # stopped meanwhile: nothing more will be handled
                    return seen or 0
                ready, _ = await self._bus.queue_depth(self.queue)
                quiet = ready == 0 and worker.in_flight == 0
                if quiet and seen == worker.processed:
                    return seen
                seen = worker.processed if quiet else None
                await asyncio.sleep(SETTLE)

    async def drain(self, *, timeout: float = 30.0) -> int:
        """Handle what the queue holds now, then stop: for one-shot runs and tests. Returns
        the number of messages handled."""
        stop = asyncio.Event()
        running = asyncio.create_task(self.run(stop, drain_timeout=timeout))
        settled = asyncio.create_task(self.idle(timeout=timeout))
        try:
            # run() ends first only when it failed to start: its error is the answer
            await asyncio.wait({running, settled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.set()
            settled.cancel()
            await asyncio.wait({running, settled})
        running.result()
        return settled.result()
