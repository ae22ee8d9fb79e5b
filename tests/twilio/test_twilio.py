"""Twilio webhooks and the SMS sender, over HTTP with real signatures, the real broker and
the real directory and router."""

import asyncio
import json
from datetime import UTC, datetime
from urllib.parse import urlencode

import httpx
import pytest
from starlette.datastructures import FormData
from twilio.request_validator import RequestValidator

from connectors.settings import HttpSettings, TwilioSettings
from connectors.twilio import TwilioSmsSender
from ingest.errors import AuthError, PermanentSendError, TransientError
from ingest.health import Health
from ingest.protocols import ReplyContext
from ingest.schema import Identity, InboundMessage, ReplyRequest, RoutedMessage
from ingest.topology import EVENTS_QUEUE, ROUTED_QUEUE, ROUTER_QUEUE
from routers import state
from routers.decider import DirectoryDecider
from routers.settings import RouterSettings, RoutingSettings
from routers.store.engine import sessionmaker
from routers.worker import RouterWorker
from tests.phone_fixtures import (
    ACCOUNT_SID,
    ACME_PHONE,
    AGENT_DIAL,
    AUTH_TOKEN,
    DEFAULT_DIAL,
    PUBLIC_URL,
    REGION,
    TEAM_DIAL,
    AppFactory,
    Phones,
    call,
    dial_of,
    parse_twiml,
    signature,
)
from tests.support.broker import take
from tests.twilio.fake_api import FakeTwilioApi


def sms(sid: str, sender: str = "0532 111 22 33", **extra: str) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": sender,
        "To": "+902125550000",
        "Body": "my order is late",
        "NumMedia": "0",
        **extra,
    }


def inbound(delivery: object) -> InboundMessage:
    return InboundMessage.model_validate_json(delivery.body)  # type: ignore[attr-defined]


@pytest.mark.parametrize("written", ["0532 111 22 33", "+90 (532) 111-2233", "905321112233"])
async def test_signed_sms_from_a_known_number_is_routed_to_their_team(
    make_phones: AppFactory, written: str
) -> None:
    """A customer texting in any format lands with their dedicated team."""
    phones = await make_phones()
    response = await phones.twilio("/webhooks/twilio/sms", sms("SM" + "1" * 32, written))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/xml")
    assert parse_twiml(response.text).tag == "Response"

    stop = asyncio.Event()
    worker = RouterWorker(
        bus=phones.bus,
        engine=phones.engine,
        decider=DirectoryDecider(phones.engine, RoutingSettings(default_region=REGION)),
        routing=RoutingSettings(default_region=REGION),
        settings=RouterSettings(prefetch=10),
        health=Health(),
    )
    task = asyncio.create_task(worker.run(stop, drain_timeout=5))
    try:
        [routed] = await take(phones.bus, ROUTED_QUEUE, 1)
    finally:
        stop.set()
        await task
    assert routed.routing_key == "team.t-istanbul"
    message = RoutedMessage.model_validate_json(routed.body)
    assert message.message.sender.address == ACME_PHONE
    assert message.message.external_id == "SM" + "1" * 32
    assert message.customer is not None
    assert message.customer.id == "c-acme"


async def test_same_message_sid_twice_is_published_once(make_phones: AppFactory) -> None:
    """Twilio retries carry the same MessageSid; the customer's text must appear once."""
    phones = await make_phones()
    params = sms("SM" + "2" * 32)
    first = await phones.twilio("/webhooks/twilio/sms", params)
    second = await phones.twilio("/webhooks/twilio/sms", params)
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.text == second.text
    [delivery] = await take(phones.bus, ROUTER_QUEUE, 1)
    assert inbound(delivery).external_id == params["MessageSid"]
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)
    assert b'omniroute_messages_in_total{channel="sms"} 1.0' in phones.metrics.render()


@pytest.mark.parametrize("signed", ["missing", "forged", "other_url"])
async def test_unsigned_or_forged_sms_is_refused(make_phones: AppFactory, signed: str) -> None:
    """Only Twilio, holding the auth token, may put messages in."""
    phones = await make_phones()
    params = sms("SM" + "3" * 32)
    headers = {}
    if signed == "forged":
        headers["X-Twilio-Signature"] = "bm90IGEgc2lnbmF0dXJl"
    elif signed == "other_url":
        from tests.phone_fixtures import signature

        headers["X-Twilio-Signature"] = signature("https://evil.test/webhooks/twilio/sms", params)
    response = await phones.client.post("/webhooks/twilio/sms", data=params, headers=headers)
    assert response.status_code == 403
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)


async def test_tampered_parameter_breaks_the_signature(make_phones: AppFactory) -> None:
    """A signature covers every parameter: changing From after signing is refused."""
    phones = await make_phones()
    params = sms("SM" + "4" * 32)
    from tests.phone_fixtures import signature

    headers = {"X-Twilio-Signature": signature(f"{PUBLIC_URL}/webhooks/twilio/sms", params)}
    params["From"] = "+15555550100"
    response = await phones.client.post("/webhooks/twilio/sms", data=params, headers=headers)
    assert response.status_code == 403


def signed_as_twilio(path: str, pairs: list[tuple[str, str]]) -> str:
    """The signature twilio's own validator computes for this form, repeats included."""
    form = FormData([(name, value) for name, value in pairs])
    return str(RequestValidator(AUTH_TOKEN).compute_signature(f"{PUBLIC_URL}{path}", form))


async def post_form(
    phones: Phones, path: str, pairs: list[tuple[str, str]], signed: str
) -> httpx.Response:
    """POST a form exactly as given, repeated names and their order included."""
    return await phones.client.post(
        path,
        content=urlencode(pairs),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            "X-Twilio-Signature": signed,
        },
    )


async def test_captured_sms_recut_with_from_twice_is_refused(make_phones: AppFactory) -> None:
    """Issue 13: a captured signed text, re-cut into ``From`` given twice and a new
    MessageSid, kept its signature and was routed as the victim customer, past the dedup."""
    phones = await make_phones()
    url = f"{PUBLIC_URL}/webhooks/twilio/sms"
    # The attacker's own text, whose body ends in "From" and the victim's number (which
    # sorts before the attacker's).
    captured = sms("SM" + "c" * 32, "+905551234567", Body="call me From" + ACME_PHONE)
    stolen = signature(url, captured)
    recut = [
        ("MessageSid", captured["MessageSid"] + "NumMedia0"),  # took NumMedia in: a new id
        ("AccountSid", ACCOUNT_SID),
        ("From", captured["From"]),
        ("From", ACME_PHONE),  # the value Starlette reads
        ("To", captured["To"]),
        ("Body", "call me "),  # gave "From" and the victim's number to From
    ]
    # Each value is signed as name + value, sorted, with no separator: the same HMAC input.
    assert signed_as_twilio("/webhooks/twilio/sms", recut) == stolen
    response = await post_form(phones, "/webhooks/twilio/sms", recut, stolen)
    assert response.status_code == 403
    assert "more than once" in response.json()["detail"]
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)


@pytest.mark.parametrize(
    ("path", "pairs", "problem"),
    [
        (
            "/webhooks/twilio/sms",
            [*sms("SM" + "d" * 32).items(), ("From", ACME_PHONE)],
            "'From' given more than once",
        ),
        ("/webhooks/twilio/sms", list(sms("SM" + "d" * 31 + "G").items()), "MessageSid"),
        ("/webhooks/twilio/sms", list(sms("SM" + "d" * 32 + "NumMedia0").items()), "MessageSid"),
        ("/webhooks/twilio/sms", list(sms("SMS-replayed-1").items()), "MessageSid"),
        (
            "/webhooks/twilio/sms",
            list({**sms("SM" + "d" * 32), "AccountSid": "AC-other"}.items()),
            "AccountSid",
        ),
        ("/webhooks/twilio/voice", list(call("CA" + "D" * 32).items()), "CallSid"),
        ("/webhooks/twilio/voice", list(call("SM" + "d" * 32).items()), "CallSid"),
        (
            "/webhooks/twilio/voice",
            [*call("CA" + "d" * 32).items(), ("CallSid", "CA" + "e" * 32)],
            "'CallSid' given more than once",
        ),
    ],
)
async def test_signed_form_twilio_never_sends_is_refused(
    make_phones: AppFactory, path: str, pairs: list[tuple[str, str]], problem: str
) -> None:
    """A repeated parameter or a SID not of Twilio's format is refused even when signed:
    the signature does not bind which value is meant, nor where one ends."""
    phones = await make_phones()
    response = await post_form(phones, path, pairs, signed_as_twilio(path, pairs))
    assert response.status_code == 403, response.text
    assert problem in response.json()["detail"]
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)


async def test_another_accounts_request_is_refused(make_phones: AppFactory) -> None:
    """With ``twilio.account_sid`` set, only that account's webhooks are taken."""
    phones = await make_phones(
        twilio=TwilioSettings(auth_token=AUTH_TOKEN, account_sid="AC" + "1" * 32)
    )
    other = await phones.twilio("/webhooks/twilio/sms", sms("SM" + "e" * 32))
    assert other.status_code == 403
    assert "AccountSid" in other.json()["detail"]
    ours = sms("SM" + "f" * 32, AccountSid="AC" + "1" * 32)
    assert (await phones.twilio("/webhooks/twilio/sms", ours)).status_code == 200
    [delivery] = await take(phones.bus, ROUTER_QUEUE, 1)
    assert inbound(delivery).external_id == ours["MessageSid"]


async def test_sms_without_from_is_400(make_phones: AppFactory) -> None:
    """A signed but incomplete request gets a clear answer, not a crash."""
    phones = await make_phones()
    params = sms("SM" + "5" * 32)
    del params["From"]
    response = await phones.twilio("/webhooks/twilio/sms", params)
    assert response.status_code == 400
    assert "From" in response.json()["detail"]


@pytest.mark.parametrize(
    ("sender", "expected"),
    [("client:alice", "client:alice"), ("ACME", "ACME"), ("sip:bob@pbx.test", "sip:bob@pbx.test")],
)
async def test_non_phone_sender_keeps_a_readable_identity(
    make_phones: AppFactory, sender: str, expected: str
) -> None:
    """Alphanumeric sender ids and client/SIP identities are input too, never a 500."""
    phones = await make_phones(
        twilio=TwilioSettings(auth_token=AUTH_TOKEN, sms_ack_text="Thanks, we got it")
    )
    response = await phones.twilio("/webhooks/twilio/sms", sms("SM" + "6" * 32, sender))
    assert response.status_code == 200
    # an acknowledgement to a sender id that cannot receive texts would only bounce
    assert "<Message>" not in response.text
    [delivery] = await take(phones.bus, ROUTER_QUEUE, 1)
    assert inbound(delivery).sender.address == expected


async def test_sms_with_media_and_ack_text(make_phones: AppFactory) -> None:
    """MMS media travel as attachment URLs; the configured acknowledgement is answered."""
    phones = await make_phones(
        twilio=TwilioSettings(auth_token=AUTH_TOKEN, sms_ack_text="Thanks, we got it")
    )
    params = sms(
        "MM" + "7" * 32,
        NumMedia="2",
        MediaUrl0="https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1",
        MediaContentType0="image/jpeg",
        MediaUrl1="https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME2",
        MediaContentType1="application/pdf",
    )
    response = await phones.twilio("/webhooks/twilio/sms", params)
    assert response.status_code == 200
    root = parse_twiml(response.text)
    assert [m.text for m in root.iter("Message")] == ["Thanks, we got it"]
    [delivery] = await take(phones.bus, ROUTER_QUEUE, 1)
    message = inbound(delivery)
    assert [(a.content_type, a.url) for a in message.attachments] == [
        ("image/jpeg", params["MediaUrl0"]),
        ("application/pdf", params["MediaUrl1"]),
    ]
    assert message.text == "my order is late"
    assert message.meta["account_sid"] == ACCOUNT_SID

    # a second text from the same sender the same day (an auto-responder?) is not answered
    again = await phones.twilio("/webhooks/twilio/sms", sms("MM" + "8" * 32))
    assert again.status_code == 200
    assert [m.text for m in parse_twiml(again.text).iter("Message")] == []
    # but Twilio's retry of the first one gets the first answer again
    retry = await phones.twilio("/webhooks/twilio/sms", params)
    assert [m.text for m in parse_twiml(retry.text).iter("Message")] == ["Thanks, we got it"]


async def test_call_from_known_number_dials_their_team(make_phones: AppFactory) -> None:
    """A registered caller reaches their team without pressing a key."""
    phones = await make_phones()
    params = call(
        "CA" + "1" * 32,
        "0532 111 22 33",
        CallerName="ACME OPS",
        StirVerstat="TN-Validation-Passed-A",
    )
    response = await phones.twilio("/webhooks/twilio/voice", params)
    assert response.status_code == 200, response.text
    dial, targets = dial_of(response.text)
    assert targets == [("Number", TEAM_DIAL)]
    assert dial.get("timeout") == "25"
    assert dial.get("action") is None
    [delivery] = await take(phones.bus, ROUTER_QUEUE, 1)
    message = inbound(delivery)
    assert (message.channel, message.external_id) == ("voice", params["CallSid"])
    assert message.meta["caller_name"] == "ACME OPS"
    assert message.meta["stir_verstat"] == "TN-Validation-Passed-A"
    # a retried webhook is answered again, not published again
    again = await phones.twilio("/webhooks/twilio/voice", params)
    assert again.text == response.text
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)


async def test_sticky_voice_dials_last_agent_with_team_fallback(make_phones: AppFactory) -> None:
    """With voice sticky, the last agent rings first and the team takes the call if not."""
    phones = await make_phones(
        routing=RoutingSettings(
            default_region=REGION, sticky_channels=["email", "sms", "twitter", "voice"]
        )
    )
    async with sessionmaker(phones.engine).begin() as session:
        await state.record_reply(
            session, agent_id="a-ayse", customer_id="c-acme", channel="sms", at=datetime.now(UTC)
        )
    response = await phones.twilio("/webhooks/twilio/voice", call("CA" + "2" * 32))
    dial, targets = dial_of(response.text)
    assert targets == [("Client", AGENT_DIAL.removeprefix("client:"))]
    action = dial.get("action")
    assert action is not None
    assert action.startswith(f"{PUBLIC_URL}/webhooks/twilio/voice?")

    query = action.split("?", 1)[1]
    no_answer = await phones.twilio(
        "/webhooks/twilio/voice",
        {**call("CA" + "2" * 32), "DialCallStatus": "no-answer"},
        query=query,
    )
    assert no_answer.status_code == 200
    _, targets = dial_of(no_answer.text)
    assert targets == [("Number", TEAM_DIAL)]
    answered = await phones.twilio(
        "/webhooks/twilio/voice",
        {**call("CA" + "2" * 32), "DialCallStatus": "completed"},
        query=query,
    )
    assert parse_twiml(answered.text).find("Hangup") is not None


async def test_caller_id_that_failed_stir_shaken_never_rings_an_agent(
    make_phones: AppFactory,
) -> None:
    """Issue 13: a spoofed caller ID (TN-Validation-Failed) gets the team, not the agent who
    knows the customer, even with voice sticky; a verified one still rings the agent."""
    phones = await make_phones(
        routing=RoutingSettings(
            default_region=REGION, sticky_channels=["email", "sms", "twitter", "voice"]
        )
    )
    async with sessionmaker(phones.engine).begin() as session:
        await state.record_reply(
            session, agent_id="a-ayse", customer_id="c-acme", channel="sms", at=datetime.now(UTC)
        )
    failed = call("CA" + "4" * 32, StirVerstat="TN-Validation-Failed-A")
    response = await phones.twilio("/webhooks/twilio/voice", failed)
    assert response.status_code == 200, response.text
    dial, targets = dial_of(response.text)
    assert targets == [("Number", TEAM_DIAL)]
    assert dial.get("action") is None, "no agent to fall back from"
    [delivery] = await take(phones.bus, ROUTER_QUEUE, 1)
    assert inbound(delivery).meta["stir_verstat"] == "TN-Validation-Failed-A"

    passed = call("CA" + "5" * 32, StirVerstat="TN-Validation-Passed-A")
    _, targets = dial_of((await phones.twilio("/webhooks/twilio/voice", passed)).text)
    assert targets == [("Client", AGENT_DIAL.removeprefix("client:"))]


@pytest.mark.parametrize(
    ("caller", "tag", "value"),
    [
        ("+905321112244", "Sip", "sip:desk@pbx.example.test"),
        ("+905321112255", "Enqueue", "support"),
        ("anonymous", "Number", DEFAULT_DIAL),
        ("+266696687", "Number", DEFAULT_DIAL),
        ("+14155550123", "Number", DEFAULT_DIAL),  # unknown caller: default team
    ],
)
async def test_voice_twiml_shapes(
    make_phones: AppFactory, caller: str, tag: str, value: str
) -> None:
    """SIP URIs, queues and withheld or unknown callers get the right TwiML verb."""
    phones = await make_phones()
    response = await phones.twilio("/webhooks/twilio/voice", call("CA" + "3" * 32, caller))
    assert response.status_code == 200
    root = parse_twiml(response.text)
    if tag == "Enqueue":
        enqueue = root.find("Enqueue")
        assert enqueue is not None
        assert enqueue.text == value
        assert root.find("Dial") is None
    else:
        assert dial_of(response.text)[1] == [(tag, value)]


async def test_status_callback_failure_becomes_outbound_failed_event(
    make_phones: AppFactory,
) -> None:
    """An undelivered reply is reported to the ticket system, not silently lost."""
    phones = await make_phones()
    params = {
        "MessageSid": "SM" + "8" * 32,
        "MessageStatus": "undelivered",
        "ErrorCode": "30003",
        "AccountSid": ACCOUNT_SID,
        "To": ACME_PHONE,
    }
    query = "request_id=reply-1&agent_id=a-ayse"
    response = await phones.twilio("/webhooks/twilio/status", params, query=query)
    assert response.status_code == 204
    [event] = await take(phones.bus, EVENTS_QUEUE, 1)
    assert event.routing_key == "outbound.failed"
    body = json.loads(event.body)
    assert (body["type"], body["request_id"], body["agent_id"]) == (
        "outbound.failed",
        "reply-1",
        "a-ayse",
    )
    assert "30003" in body["reason"]
    delivered = await phones.twilio(
        "/webhooks/twilio/status", {**params, "MessageStatus": "delivered"}, query=query
    )
    assert delivered.status_code == 204
    assert await phones.bus.queue_depth(EVENTS_QUEUE) == (0, 0)
    forged = await phones.client.post("/webhooks/twilio/status?" + query, data=params)
    assert forged.status_code == 403


def reply(to: str) -> ReplyRequest:
    return ReplyRequest(
        id="reply-42",
        channel="sms",
        agent_id="a-ayse",
        to=Identity(kind="phone", address=to),
        text="We are on it",
    )


async def test_sms_sender_against_fake_twilio_api(fake_twilio: FakeTwilioApi) -> None:
    """Replies go through twilio's async client; errors map to permanent or transient."""
    sender = TwilioSmsSender(
        TwilioSettings(
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_number="+902125550000",
            api_base_url=fake_twilio.url,
            send_timeout=5,
        ),
        HttpSettings(public_url=PUBLIC_URL),
        region=REGION,
    )
    try:
        result = await sender.send(reply("0532 111 22 33"), ReplyContext())
        assert result.external_id == "SM" + "a" * 32
        [sent] = fake_twilio.requests
        assert (sent["To"], sent["From"], sent["Body"]) == (
            ACME_PHONE,
            "+902125550000",
            "We are on it",
        )
        assert sent["StatusCallback"] == (
            f"{PUBLIC_URL}/webhooks/twilio/status?request_id=reply-42&agent_id=a-ayse"
        )
        assert (fake_twilio.auth[0] or "").startswith("Basic ")

        with pytest.raises(PermanentSendError, match="21211"):
            await sender.send(reply(FakeTwilioApi.INVALID), ReplyContext())
        with pytest.raises(TransientError, match="20500"):
            await sender.send(reply(FakeTwilioApi.BROKEN), ReplyContext())
        with pytest.raises(PermanentSendError, match="not a phone number"):
            await sender.send(reply("client:alice"), ReplyContext())
    finally:
        await sender.close()


async def test_sms_sender_unreachable_api_is_transient_and_bad_auth_is_auth_error(
    fake_twilio: FakeTwilioApi,
) -> None:
    """A network failure is retried later; refused credentials are not."""
    from tests.support.net import free_port

    base = {"account_sid": ACCOUNT_SID, "from_number": "+902125550000", "send_timeout": 5}
    unreachable = TwilioSmsSender(
        TwilioSettings(
            **base, auth_token=AUTH_TOKEN, api_base_url=f"http://127.0.0.1:{free_port()}"
        ),
        HttpSettings(),
        region=REGION,
    )
    wrong_token = TwilioSmsSender(
        TwilioSettings(**base, auth_token="not-the-token", api_base_url=fake_twilio.url),
        HttpSettings(),
        region=REGION,
    )
    try:
        with pytest.raises(TransientError):
            await unreachable.send(reply(ACME_PHONE), ReplyContext())
        with pytest.raises(AuthError, match="20003"):
            await wrong_token.send(reply(ACME_PHONE), ReplyContext())
    finally:
        await unreachable.close()
        await wrong_token.close()
