"""The one de-duplicating sink the webhooks and the X poller share (issue 14)."""

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.dedup import OnceSink
from ingest.errors import TransientError
from ingest.metrics import Metrics
from ingest.schema import Identity, InboundMessage
from ingest.settings import BusSettings
from ingest.sink import BusSink
from ingest.topology import ROUTER_QUEUE
from routers.store.connector_state import DbSeenStore
from tests.support.net import free_port


def tweet(n: int) -> InboundMessage:
    return InboundMessage(
        channel="twitter",
        external_id=f"18000000000000000{n:02d}",
        sender=Identity(kind="twitter", address="id:42"),
    )


async def test_a_message_is_published_once_and_a_failed_one_is_taken_again(
    bus: Bus, engine: AsyncEngine
) -> None:
    """A retry of what was published is dropped; a retry of what failed is taken."""
    seen = DbSeenStore(engine)
    metrics = Metrics()
    once = OnceSink(BusSink(bus), seen, name="test", open_on_outage=False, metrics=metrics)
    assert await once.first_time("twitter", tweet(1).external_id)
    await once.submit(tweet(1))
    assert not await once.first_time("twitter", tweet(1).external_id)
    assert (await bus.queue_depth(ROUTER_QUEUE))[0] == 1
    assert b'omniroute_messages_in_total{channel="twitter"} 1.0' in metrics.render()

    away = Bus(f"amqp://guest:guest@127.0.0.1:{free_port()}/", BusSettings(), name="away")
    failing = OnceSink(BusSink(away), seen, name="test", open_on_outage=False)
    assert await failing.first_time("twitter", tweet(2).external_id)
    with pytest.raises(TransientError):
        await failing.submit(tweet(2))
    assert await once.first_time("twitter", tweet(2).external_id), "the mark was undone"
