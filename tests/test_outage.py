"""A short directory outage must not cost good messages: workers hold and retry them
instead of spending the broker's delivery limit in seconds."""

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

from ingest.bus import Bus
from ingest.health import Health
from ingest.schema import Identity, InboundMessage
from ingest.settings import BusSettings
from ingest.topology import DEAD_QUEUE, INBOUND, ROUTED_QUEUE
from routers.decider import DirectoryDecider
from routers.settings import DirectorySettings, RouterSettings, RoutingSettings
from routers.store.engine import create_engine, migrate
from routers.worker import RouterWorker
from tests.seed import seed
from tests.support.broker import Taken, take
from tests.support.net import TcpProxy


async def test_directory_outage_holds_messages_and_dead_letters_none(
    amqp_url: str, pg_url: str
) -> None:
    await migrate(pg_url)
    direct = create_engine(pg_url)
    await seed(direct)
    await direct.dispose()
    target = urlsplit(pg_url)
    proxy = TcpProxy("127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = pg_url.replace(f":{target.port}/", f":{proxy.port}/")
    engine = create_engine(proxied, DirectorySettings(statement_timeout=1.0))
    bus = Bus(amqp_url, BusSettings(delivery_limit=2, transient_retry_for=60), name="outage")
    await bus.open()
    routing = RoutingSettings(default_region="TR")
    router = RouterWorker(
        bus=bus,
        engine=engine,
        decider=DirectoryDecider(engine, routing),
        routing=routing,
        settings=RouterSettings(prefetch=32),
        health=Health(),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(router.run(stop, drain_timeout=5))
    try:
        await proxy.cut()
        messages = [
            InboundMessage(
                channel="email",
                external_id=f"<outage-{i}@acme.test>",
                sender=Identity(kind="email", address="ayse@acme.test"),
            )
            for i in range(20)
        ]
        for m in messages:
            await bus.publish(INBOUND, m.channel, m, message_id=m.id)
        await asyncio.sleep(5)  # the outage: longer than two immediate requeues would last
        await proxy.start()

        def ids(taken: Sequence[Taken]) -> set[str]:
            return {got.message_id or "" for got in taken}

        taken = await take(
            bus, ROUTED_QUEUE, until=lambda got: len(ids(got)) >= len(messages), timeout=60
        )
        seen = ids(taken)
        assert seen == {m.id for m in messages}
        dead, _ = await bus.queue_depth(DEAD_QUEUE)
        assert dead == 0
    finally:
        stop.set()
        await task
        await bus.close()
        await engine.dispose()
        await proxy.cut()
