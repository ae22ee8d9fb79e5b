"""The router and the outbound dispatcher on a test's vhost and directory, started and
stopped the way the daemon does it, for end-to-end tests of a channel."""

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from config.components import WorkerLoop
from ingest.bus import Bus
from ingest.health import Health
from ingest.protocols import Sender
from routers.decider import DirectoryDecider
from routers.dispatcher import OutboundDispatcher
from routers.settings import DispatchSettings, RouterSettings, RoutingSettings
from routers.worker import RouterWorker
from tests.support.broker import take
from tests.support.waiting import until


class Workers:
    def __init__(
        self,
        bus: Bus,
        engine: AsyncEngine,
        sender: Sender,
        routing: RoutingSettings | None = None,
    ) -> None:
        routing = routing or RoutingSettings(default_region="TR")
        self.bus = bus
        self.health = Health()
        self.sender = sender
        self.router = RouterWorker(
            bus=bus,
            engine=engine,
            decider=DirectoryDecider(engine, routing),
            routing=routing,
            settings=RouterSettings(prefetch=8),
            health=self.health,
        )
        self.dispatcher = OutboundDispatcher(
            bus=bus,
            engine=engine,
            senders={sender.channel: sender},
            routing=routing,
            settings=DispatchSettings(attempts=2, base_delay=0.05),
            health=self.health,
        )
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self, *intake: WorkerLoop) -> None:
        """Start the workers and any intake loops, and wait until all say they are up."""
        self.tasks = [
            asyncio.create_task(self.router.run(self.stop, drain_timeout=5)),
            asyncio.create_task(self.dispatcher.run(self.stop, drain_timeout=5)),
            *(asyncio.create_task(run(self.stop)) for run in intake),
        ]
        await until(lambda: self.health.ready()[0], 15, "every worker and intake up")

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*self.tasks)

    async def next_from(self, queue_name: str, timeout: float = 15) -> tuple[str, bytes]:
        """The next message on a queue, taken off it: (routing key, body); bounded."""
        [got] = await take(self.bus, queue_name, 1, timeout)
        return got.routing_key, got.body
