"""The X channel end to end: a loopback X API, the connector, the real router and outbound
dispatcher on RabbitMQ, and the directory: the issue's story from mention to last agent."""

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.twitter import TwitterConnector, TwitterSender
from ingest.bus import EVENTS_QUEUE, OUTBOUND, ROUTED_QUEUE, Bus
from ingest.health import Health
from ingest.schema import Identity, ReplyRequest, RoutedMessage
from ingest.sink import BusSink
from routers.decider import Decider
from routers.dispatcher import DispatchSettings, OutboundDispatcher
from routers.settings import RouterSettings, RoutingSettings
from routers.store import DbCursorStore, DbSeenStore
from routers.worker import RouterWorker
from tests.seed import seed
from tests.twitter_fixtures import (
    ACCOUNT_ID,
    FakeX,
    dm_event,
    fake_x_fixture,  # noqa: F401 (registers the fake_x fixture)
    tweet,
    user,
)

ACME = user("9876543210", "AcmeLtd", "Acme Ltd")  # the seeded customer's handle is "acmeltd"


class Stack:
    """Router and dispatcher running on the test vhost, the X sender handed to the latter."""

    def __init__(self, bus: Bus, engine: AsyncEngine, fake: FakeX) -> None:
        routing = RoutingSettings(default_region="TR")
        self.bus = bus
        self.health = Health()
        self.sender = TwitterSender(fake.settings())
        self.router = RouterWorker(
            bus=bus,
            engine=engine,
            decider=Decider(engine, routing),
            routing=routing,
            settings=RouterSettings(prefetch=8),
            health=self.health,
        )
        self.dispatcher = OutboundDispatcher(
            bus=bus,
            engine=engine,
            senders={self.sender.channel: self.sender},
            routing=routing,
            settings=DispatchSettings(attempts=2, base_delay=0.05),
            health=self.health,
        )
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.router.run(self.stop, drain_timeout=5)),
            asyncio.create_task(self.dispatcher.run(self.stop, drain_timeout=5)),
        ]
        async with asyncio.timeout(10):
            while self.health.ready()[1]:
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.stop.set()
        try:
            await asyncio.wait_for(asyncio.gather(*self.tasks), 10)
        finally:
            await self.sender.aclose()

    async def next_from(self, queue_name: str, timeout: float = 10) -> tuple[str, bytes]:
        """The next message on a queue, acked: (routing key, body); bounded."""
        channel = await self.bus.connection.channel()
        try:
            queue = await channel.get_queue(queue_name)
            async with asyncio.timeout(timeout):
                while True:
                    got = await queue.get(fail=False)
                    if got is not None:
                        await got.ack()
                        return got.routing_key or "", got.body
                    await asyncio.sleep(0.02)
        finally:
            await channel.close()


@pytest.fixture
async def stack(bus: Bus, engine: AsyncEngine, fake_x: FakeX) -> AsyncIterator[Stack]:
    await seed(engine)
    s = Stack(bus, engine, fake_x)
    await s.start()
    yield s
    await s.close()


async def test_mention_goes_to_team_and_the_dm_after_the_reply_to_that_agent(
    stack: Stack, fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """The issue's done-when: a known handle's mention reaches the customer's team; once an
    agent answered on X, the customer's next DM reaches that agent as last_agent."""
    fake_x.users[ACME["id"]] = ACME
    fake_x.mentions = [tweet("1790000000000000701", ACME, "@AcmeSupport the modem is dead")]
    conn = TwitterConnector(
        fake_x.settings(), BusSink(bus), DbCursorStore(engine), DbSeenStore(engine), Health()
    )
    try:
        assert await conn.poll_once() == 1
        key, body = await stack.next_from(ROUTED_QUEUE)
        routed = RoutedMessage.model_validate_json(body)
        assert (key, routed.route.reason) == ("team.billing", "dedicated_team")
        assert routed.customer is not None
        assert routed.customer.id == "acme"

        reply = ReplyRequest(
            id="reply-1",
            channel="twitter",
            agent_id="ana",
            to=routed.message.sender,
            text="We are on it, Acme.",
            in_reply_to=routed.message.id,
        )
        await bus.publish(OUTBOUND, "twitter", reply, message_id=reply.id)
        _, event = await stack.next_from(EVENTS_QUEUE)
        assert json.loads(event)["type"] == "outbound.sent", event
        assert [p.json for p in fake_x.hits("/2/tweets")] == [
            {
                "text": "We are on it, Acme.",
                "reply": {"in_reply_to_tweet_id": "1790000000000000701"},
            }
        ]

        fake_x.dm_events = [dm_event("1800000000000000701", ACME, "still dead, any news?")]
        assert await conn.poll_once() == 1
        key, body = await stack.next_from(ROUTED_QUEUE)
    finally:
        await conn.aclose()
    routed = RoutedMessage.model_validate_json(body)
    assert (key, routed.route.reason) == ("agent.ana", "last_agent")
    assert routed.message.external_id == "dm:1800000000000000701"
    assert routed.message.sender == Identity(
        kind="twitter", address=f"id:{ACME['id']}", aliases=["acmeltd"], name="Acme Ltd"
    )
    assert routed.message.recipient == Identity(kind="twitter", address=f"id:{ACCOUNT_ID}")
