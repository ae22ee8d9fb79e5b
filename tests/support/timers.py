"""One instance's timer worker for the durability tests (offers and escalations alike): its
own engine, bus (on the shared vhost) and decider, as a separate process would have."""

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from ingest.health import Health
from routers.decider import DirectoryDecider
from routers.settings import RoutingSettings
from routers.store.engine import create_engine
from routers.timers import TimerWorker
from tests.support.broker import opened_bus

W = TypeVar("W", bound=TimerWorker)


@contextlib.asynccontextmanager
async def instance(kind: type[W], db_url: str, amqp_url: str, name: str) -> AsyncIterator[W]:
    routing = RoutingSettings(default_region="TR")
    engine = create_engine(db_url)
    try:
        async with opened_bus(amqp_url, name=name) as bus:
            yield kind(
                bus=bus,
                engine=engine,
                decider=DirectoryDecider(engine, routing),
                routing=routing,
                health=Health(),
            )
    finally:
        await engine.dispose()
