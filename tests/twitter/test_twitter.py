"""The X connector against a loopback X API v2, the real RabbitMQ and the real stores."""

import asyncio
import logging
import socket
from typing import Any

import pytest
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.twitter import TwitterConnector
from connectors.twitter.sender import TwitterSender
from ingest.bus import Bus
from ingest.errors import PermanentSendError, TransientError
from ingest.health import Health
from ingest.protocols import ReplyContext
from ingest.schema import Identity, InboundMessage, ReplyRequest
from ingest.sink import BusSink
from routers.store.connector_state import DbCursorStore, DbSeenStore
from tests.support.broker import published
from tests.support.waiting import until
from tests.twitter.fake_api import (
    ACCOUNT,
    ACCOUNT_ID,
    ALICE,
    BEARER,
    BOB,
    FakeX,
    Scripted,
    dm_event,
    rate_limited,
    tweet,
)

MENTIONS_KEY = f"twitter:mentions:{ACCOUNT_ID}"
DM_KEY = f"twitter:dm:{ACCOUNT_ID}"
OLD = "1790000000000000100"


def connector(fake: FakeX, bus: Bus, engine: AsyncEngine, **overrides: Any) -> TwitterConnector:
    return TwitterConnector(
        fake.settings(**overrides),
        BusSink(bus),
        DbCursorStore(engine),
        DbSeenStore(engine),
        Health(),
    )


def five_mentions() -> list[dict[str, Any]]:
    """Newest first, as X returns them; one is the account's own, one predates the cursor."""
    return [
        tweet("1790000000000000105", ALICE, "@AcmeSupport still broken", replied_to=OLD),
        tweet("1790000000000000104", ACCOUNT, "@AcmeSupport note to self"),
        tweet("1790000000000000103", BOB, "@AcmeSupport hello", media_keys=["3_1"]),
        tweet("1790000000000000102", ALICE, "@AcmeSupport my order", conversation="17"),
        tweet("1790000000000000101", BOB, "@AcmeSupport first"),
        tweet(OLD, ALICE, "@AcmeSupport already taken"),
    ]


async def test_mentions_across_pages_are_published_before_since_id_moves(
    fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """A cursor that moved before every page was safe would lose the unread pages."""
    fake_x.mentions = five_mentions()
    fake_x.media["3_1"] = {
        "media_key": "3_1",
        "type": "photo",
        "url": "https://pbs.twimg.com/media/abc.png",
    }
    cursors = DbCursorStore(engine)
    await cursors.set(MENTIONS_KEY, OLD)
    conn = connector(fake_x, bus, engine)
    # the last of three pages keeps failing: nothing may be published, the cursor stays
    fake_x.fail_next("mentions", *[Scripted(503, page="page-4")] * 4)
    try:
        with pytest.raises(TransientError):
            await conn.drain()
        assert await cursors.get(MENTIONS_KEY) == OLD
        assert await published(bus) == []

        assert await conn.drain() == 4
    finally:
        await conn.aclose()
    got = await published(bus)
    assert [m.external_id for m in got] == [
        "1790000000000000101",
        "1790000000000000102",
        "1790000000000000103",
        "1790000000000000105",
    ], "oldest first, own tweet skipped, nothing older than the cursor"
    assert await cursors.get(MENTIONS_KEY) == "1790000000000000105"
    assert {r.query.get("since_id") for r in fake_x.hits(f"/2/users/{ACCOUNT_ID}/mentions")} == {
        OLD
    }

    first, second, third, newest = got
    assert first.sender == Identity(
        kind="twitter", address="id:783214", aliases=["bob"], name="Bob"
    )
    assert second.sender.aliases == ["alice_example"]
    assert second.recipient == Identity(kind="twitter", address=f"id:{ACCOUNT_ID}")
    assert second.thread is not None
    assert second.thread.references == ["17"]
    assert third.attachments[0].url == "https://pbs.twimg.com/media/abc.png"
    assert third.attachments[0].content_type == "image/png"
    assert newest.channel == "twitter"
    assert newest.text == "@AcmeSupport still broken"
    assert newest.meta["kind"] == "mention"
    assert newest.meta["entities"]["mentions"][0]["username"] == "AcmeSupport"
    assert newest.meta["conversation_id"] == "1790000000000000105"
    assert newest.thread is not None
    assert newest.thread.message_id == "1790000000000000105"
    assert newest.thread.in_reply_to == OLD


async def test_restart_resumes_from_stored_cursors_without_duplicates(
    fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """A daemon restart must neither repeat nor lose a mention or a DM."""
    fake_x.mentions = five_mentions()
    fake_x.dm_events = [
        dm_event("1800000000000000002", ALICE, "hi"),
        dm_event("1800000000000000001", BOB, "yo"),
    ]
    first = connector(fake_x, bus, engine)
    try:
        assert await first.drain() == 7
    finally:
        await first.aclose()
    assert len(await published(bus)) == 7

    fake_x.mentions.insert(0, tweet("1790000000000000106", BOB, "@AcmeSupport again"))
    fake_x.dm_events.insert(0, dm_event("1800000000000000003", BOB, "and again"))
    second = connector(fake_x, bus, engine)
    try:
        assert await second.drain() == 2
        assert await second.drain() == 0
    finally:
        await second.aclose()
    assert sorted(m.external_id for m in await published(bus)) == [
        "1790000000000000106",
        "dm:1800000000000000003",
    ]
    mention_requests = fake_x.hits(f"/2/users/{ACCOUNT_ID}/mentions")
    assert mention_requests[-1].query["since_id"] == "1790000000000000106"


async def test_own_tweets_and_dms_are_skipped_and_a_first_start_reads_one_page(
    fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """The account's own replies must never come back in as customer messages; and a first
    start must not flood the teams with the account's whole history."""
    fake_x.mentions = [
        tweet("1790000000000000203", ACCOUNT, "@AcmeSupport me"),
        tweet("1790000000000000202", ALICE, "@AcmeSupport newest page"),
        tweet("1790000000000000201", BOB, "@AcmeSupport an older page"),
    ]
    fake_x.dm_events = [dm_event("1800000000000000201", ACCOUNT, "our answer")]
    conn = connector(fake_x, bus, engine, backfill_pages=1)
    try:
        assert await conn.drain() == 1
    finally:
        await conn.aclose()
    assert [m.external_id for m in await published(bus)] == ["1790000000000000202"]
    assert len(fake_x.hits(f"/2/users/{ACCOUNT_ID}/mentions")) == 1
    cursors = DbCursorStore(engine)
    assert await cursors.get(MENTIONS_KEY) == "1790000000000000203"
    assert await cursors.get(DM_KEY) == "1800000000000000201"


async def test_dms_are_paged_until_the_last_taken_event_and_deduplicated(
    fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """DM events have no since_id: paging must stop at the known event, and an event seen
    again (a cursor write lost after the publish) must not be published twice."""
    fake_x.dm_events = [
        dm_event(f"18000000000000003{n:02d}", ALICE if n % 2 else BOB, f"dm {n}")
        for n in range(6, 0, -1)
    ]
    cursors = DbCursorStore(engine)
    await cursors.set(DM_KEY, "1800000000000000303")  # on page two of three
    conn = connector(fake_x, bus, engine)
    try:
        assert await conn.drain() == 3
        assert [r.query.get("pagination_token") for r in fake_x.hits("/2/dm_events")] == [
            None,
            "page-2",
        ], "page three is older than the cursor and must not be fetched"
        got = await published(bus)
        assert [m.external_id for m in got] == [
            "dm:1800000000000000304",
            "dm:1800000000000000305",
            "dm:1800000000000000306",
        ]
        assert got[0].meta["kind"] == "dm"
        assert got[0].meta["dm_conversation_id"] == f"783214-{ACCOUNT_ID}"
        assert got[0].sender.address == "id:783214"
        assert got[1].sender.aliases == ["alice_example"]
        assert await cursors.get(DM_KEY) == "1800000000000000306"

        await cursors.set(DM_KEY, "1800000000000000303")  # as if that write had been lost
        assert await conn.drain() == 0, "events already taken are read again, not published"
    finally:
        await conn.aclose()
    assert len(fake_x.hits("/2/dm_events")) == 4
    assert await published(bus) == []
    query = fake_x.hits("/2/dm_events")[0].query
    assert query["event_types"] == "MessageCreate"
    assert "sender_id" in query["expansions"]
    assert fake_x.hits("/2/dm_events")[0].authorization.startswith("OAuth ")


async def test_rate_limit_waits_until_the_reset_then_continues(
    fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """tweepy's own wait spins without a reset header; ours waits for it and says when."""
    fake_x.mentions = [tweet("1790000000000000301", ALICE, "@AcmeSupport hi")]
    answer = rate_limited(reset_in=1.5)
    reset = int(answer.headers["x-rate-limit-reset"])
    fake_x.fail_next("mentions", answer)
    conn = connector(fake_x, bus, engine)
    try:
        with structlog.testing.capture_logs() as logs:
            assert await conn.drain() == 1
    finally:
        await conn.aclose()
    hits = fake_x.hits(f"/2/users/{ACCOUNT_ID}/mentions")
    assert len(hits) == 2
    assert hits[1].at >= reset - 0.05, "retried before the window reset"
    limited = [e for e in logs if e["event"] == "twitter.rate_limited"]
    assert len(limited) == 1
    assert limited[0]["endpoint"] == "mentions"
    assert "resume_at" in limited[0]


async def test_server_error_backs_off_marks_down_once_and_recovers(
    fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """A 503 storm is a state change logged once, then a recovery logged once."""
    fake_x.dm_events = [dm_event("1800000000000000401", BOB, "anyone there?")]
    fake_x.fail_next("dm_events", *[Scripted(503)] * 5)  # attempts are 4 per pass
    health = Health()
    conn = TwitterConnector(
        fake_x.settings(), BusSink(bus), DbCursorStore(engine), DbSeenStore(engine), health
    )
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(conn.run(stop))
        try:
            await until(lambda: health.components["twitter"].state == "up", 10, "twitter up")
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)
    events = [e["event"] for e in logs]
    assert events.count("twitter.unavailable") == 1
    assert events.count("twitter.recovered") == 1
    assert len(fake_x.hits("/2/dm_events")) == 6
    assert [m.external_id for m in await published(bus)] == ["dm:1800000000000000401"]
    assert health.snapshot()["twitter"]["state"] == "stopped"


async def test_refused_credentials_mark_down_and_run_returns(
    fake_x: FakeX, bus: Bus, engine: AsyncEngine
) -> None:
    """A revoked token must stop this connector, visibly, without taking the daemon down."""
    fake_x.fail_next("mentions", Scripted(401))
    health = Health()
    conn = TwitterConnector(
        fake_x.settings(), BusSink(bus), DbCursorStore(engine), DbSeenStore(engine), health
    )
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(conn.run(stop), 5)
    assert not stop.is_set()
    assert health.components["twitter"].state == "down"
    assert "401" in health.components["twitter"].reason
    assert not health.ready()[0]
    assert [e["event"] for e in logs].count("twitter.auth_failed") == 1
    assert len(fake_x.requests) == 1, "credentials are not retried"


def _original(kind: str, external_id: str) -> InboundMessage:
    return InboundMessage(
        channel="twitter",
        external_id=external_id,
        sender=Identity(kind="twitter", address=f"id:{ALICE['id']}", aliases=["alice_example"]),
        meta={"kind": kind},
    )


def _reply(to: str = f"id:{ALICE['id']}") -> ReplyRequest:
    return ReplyRequest(
        id="r1",
        channel="twitter",
        agent_id="agent-7",
        to=Identity(kind="twitter", address=to),
        text="Sorry about that, we are on it.",
    )


async def test_sender_replies_to_a_mention_and_sends_a_dm_for_a_dm(fake_x: FakeX) -> None:
    """The answer must land where the customer spoke: under the tweet, or in the DMs."""
    sender = TwitterSender(fake_x.settings())
    try:
        tweeted = await sender.send(
            _reply(), ReplyContext(original=_original("mention", "1790000000000000501"))
        )
        dm = await sender.send(_reply(), ReplyContext(original=_original("dm", "dm:18")))
        cold = await sender.send(_reply(), ReplyContext(original=None))
    finally:
        await sender.aclose()
    assert sender.channel == "twitter"
    posted = fake_x.hits("/2/tweets")
    assert [p.json for p in posted] == [
        {
            "text": "Sorry about that, we are on it.",
            "reply": {"in_reply_to_tweet_id": "1790000000000000501"},
        }
    ]
    assert posted[0].authorization.startswith("OAuth ")
    assert tweeted.external_id is not None
    assert tweeted.external_id.isdigit()
    dms = fake_x.hits(f"/2/dm_conversations/with/{ALICE['id']}/messages")
    assert [d.json for d in dms] == [{"text": "Sorry about that, we are on it."}] * 2
    assert dm.external_id is not None
    assert dm.external_id.startswith("dm:")
    assert cold.external_id is not None
    assert cold.external_id != dm.external_id


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, PermanentSendError),
        (403, PermanentSendError),
        (429, TransientError),
        (503, TransientError),
    ],
)
async def test_sender_maps_x_errors_to_permanent_or_transient(
    fake_x: FakeX, status: int, error: type[Exception]
) -> None:
    """The dispatcher retries transient failures only; a refused reply must not loop."""
    fake_x.fail_next("dm_send", Scripted(status))
    sender = TwitterSender(fake_x.settings())
    try:
        with pytest.raises(error):
            await sender.send(_reply(), ReplyContext())
    finally:
        await sender.aclose()


async def test_sender_network_failure_is_transient(fake_x: FakeX) -> None:
    """A peer that is not there must be retried by the dispatcher, not reported as refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    sender = TwitterSender(fake_x.settings(api_base_url=closed))
    try:
        with pytest.raises(TransientError):
            await sender.send(_reply(), ReplyContext())
    finally:
        await sender.aclose()


async def test_sender_refuses_a_dm_to_a_handle_without_user_id(fake_x: FakeX) -> None:
    """X's DM endpoint takes a user id; guessing one from a handle would message a stranger."""
    sender = TwitterSender(fake_x.settings())
    try:
        with pytest.raises(PermanentSendError):
            await sender.send(_reply(to="@alice_example"), ReplyContext())
    finally:
        await sender.aclose()
    assert fake_x.requests == []


async def test_bearer_token_never_reaches_the_logs(
    fake_x: FakeX,
    bus: Bus,
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """tweepy logs the Authorization header at DEBUG; a daemon at DEBUG must not leak it."""
    caplog.set_level(logging.DEBUG)
    fake_x.mentions = [tweet("1790000000000000601", ALICE, "@AcmeSupport hi")]
    fake_x.fail_next("dm_events", Scripted(401))
    with structlog.testing.capture_logs() as logs:
        conn = connector(fake_x, bus, engine, api_base_url=fake_x.base_url)
        await asyncio.wait_for(conn.run(asyncio.Event()), 5)
        sender = TwitterSender(fake_x.settings())
        try:
            await sender.send(_reply(), ReplyContext())
        finally:
            await sender.aclose()
    assert fake_x.hits(f"/2/users/{ACCOUNT_ID}/mentions")[0].authorization == f"Bearer {BEARER}"
    captured = capsys.readouterr()
    assert logs, "the connector logged nothing: this test would prove nothing"
    for text in (caplog.text, captured.out, captured.err, repr(logs)):
        assert BEARER not in text
        assert "access-secret" not in text
    assert not logging.getLogger("tweepy.asynchronous.client").isEnabledFor(logging.DEBUG)


def test_a_huge_field_in_an_x_item_is_cut_not_carried() -> None:
    """Whatever a response holds, a message carries at most X's own limits (issue 13)."""
    from connectors.twitter.messages import MAX_MEDIA, MAX_NAME, MAX_TEXT, XNormaliser

    media = {
        f"m{n}": {"media_key": f"m{n}", "type": "photo", "url": "https://x/p.jpg"}
        for n in range(50)
    }
    tweet = {
        "id": "1800000000000000001",
        "author_id": "42",
        "text": "a" * 1_000_000,
        "attachments": {"media_keys": list(media)},
    }
    users = {"42": {"id": "42", "username": "ayse", "name": "N" * 100_000}}
    message = XNormaliser("999").mention(tweet, users, media)
    assert message is not None
    assert len(message.text) == MAX_TEXT
    assert message.sender.name is not None
    assert len(message.sender.name) == MAX_NAME
    assert len(message.attachments) == MAX_MEDIA
