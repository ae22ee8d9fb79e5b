"""The X channel end to end: a loopback X API, the connector, the real router and outbound
dispatcher on RabbitMQ, and the directory: the issue's story from mention to last agent."""

import json
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.twitter import TwitterConnector
from connectors.twitter.sender import TwitterSender
from ingest.bus import Bus
from ingest.health import Health
from ingest.schema import Identity, ReplyRequest, RoutedMessage
from ingest.sink import BusSink
from ingest.topology import EVENTS_QUEUE, OUTBOUND, ROUTED_QUEUE
from routers.store.connector_state import DbCursorStore, DbSeenStore
from tests.seed import seed
from tests.twitter.fake_api import ACCOUNT_ID, FakeX, dm_event, tweet, user
from tests.workers import Workers

ACME = user("9876543210", "AcmeLtd", "Acme Ltd")  # the seeded customer's handle is "acmeltd"


class Stack(Workers):
    """Router and dispatcher running on the test vhost, the X sender handed to the latter."""

    def __init__(self, bus: Bus, engine: AsyncEngine, fake: FakeX) -> None:
        self.x = TwitterSender(fake.settings())
        super().__init__(bus, engine, self.x)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self.x.aclose()


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
        assert await conn.drain() == 1
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
        assert await conn.drain() == 1
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
