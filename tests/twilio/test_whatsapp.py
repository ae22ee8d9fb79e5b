"""WhatsApp through Twilio (issue 14): the Messaging webhook's ``whatsapp:`` messages, replies
through the Messages API with ``whatsapp:`` addresses, and one customer known by phone
whatever the channel, over the real broker, directory, router and dispatcher."""

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from connectors.settings import HttpSettings, TwilioSettings
from connectors.twilio import TwilioSmsSender, TwilioWhatsAppSender
from ingest.errors import PermanentSendError
from ingest.health import Health
from ingest.protocols import ReplyContext, Sender
from ingest.schema import Channel, Identity, InboundMessage, ReplyRequest, RoutedMessage
from ingest.topology import EVENTS_QUEUE, OUTBOUND, ROUTED_QUEUE, ROUTER_QUEUE
from routers.decider import DirectoryDecider
from routers.dispatcher import OutboundDispatcher
from routers.settings import DispatchSettings, RouterSettings, RoutingSettings
from routers.worker import RouterWorker
from tests.phone_fixtures import (
    ACCOUNT_SID,
    ACME_PHONE,
    AUTH_TOKEN,
    PUBLIC_URL,
    REGION,
    AppFactory,
    Phones,
)
from tests.support.broker import take
from tests.twilio.fake_api import FakeTwilioApi

SMS_FROM = "+902125550000"
WHATSAPP_FROM = "+14155238886"  # Twilio's WhatsApp sandbox number


def whatsapp(sid: str, sender: str = ACME_PHONE, **extra: str) -> dict[str, str]:
    """A WhatsApp message as Twilio's Messaging webhook posts it."""
    return {
        "SmsMessageSid": sid,
        "NumMedia": "0",
        "ProfileName": "Acme Ops",
        "MessageType": "text",
        "SmsSid": sid,
        "WaId": sender.removeprefix("+"),
        "SmsStatus": "received",
        "Body": "my order is late",
        "To": f"whatsapp:{WHATSAPP_FROM}",
        "NumSegments": "1",
        "ReferralNumMedia": "0",
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": f"whatsapp:{sender}",
        "ApiVersion": "2010-04-01",
        **extra,
    }


def sms(sid: str, sender: str = ACME_PHONE) -> dict[str, str]:
    return {
        "MessageSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": sender,
        "To": SMS_FROM,
        "Body": "still waiting",
        "NumMedia": "0",
    }


def reply(request_id: str, channel: Channel, to: str = ACME_PHONE) -> ReplyRequest:
    return ReplyRequest(
        id=request_id,
        channel=channel,
        agent_id="a-ayse",
        to=Identity(kind="phone", address=to),
        text="We are on it",
    )


def twilio_settings(api: FakeTwilioApi, **extra: Any) -> TwilioSettings:
    return TwilioSettings(
        account_sid=ACCOUNT_SID,
        auth_token=AUTH_TOKEN,
        from_number=SMS_FROM,
        api_base_url=api.url,
        send_timeout=5,
        **extra,
    )


def senders(api: FakeTwilioApi, **extra: Any) -> list[Sender]:
    settings = twilio_settings(api, **extra)
    http = HttpSettings(public_url=PUBLIC_URL)
    return [
        TwilioSmsSender(settings, http, region=REGION),
        TwilioWhatsAppSender(settings, http, region=REGION),
    ]


@asynccontextmanager
async def running(phones: Phones, outbound: list[Sender]) -> AsyncIterator[None]:
    """The router and the dispatcher, as the daemon runs them, for the test's duration."""
    routing = RoutingSettings(default_region=REGION)
    stop = asyncio.Event()
    router = RouterWorker(
        bus=phones.bus,
        engine=phones.engine,
        decider=DirectoryDecider(phones.engine, routing),
        routing=routing,
        settings=RouterSettings(prefetch=10),
        health=Health(),
    )
    dispatcher = OutboundDispatcher(
        bus=phones.bus,
        engine=phones.engine,
        senders={sender.channel: sender for sender in outbound},
        routing=routing,
        settings=DispatchSettings(attempts=1),
        health=Health(),
    )
    tasks = [
        asyncio.create_task(router.run(stop, drain_timeout=5)),
        asyncio.create_task(dispatcher.run(stop, drain_timeout=5)),
    ]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for sender in outbound:
            await sender.close()  # type: ignore[attr-defined]  # the Twilio senders close


async def routed(phones: Phones) -> tuple[str, RoutedMessage]:
    [delivery] = await take(phones.bus, ROUTED_QUEUE, 1)
    return delivery.routing_key, RoutedMessage.model_validate_json(delivery.body)


async def event(phones: Phones) -> dict[str, Any]:
    [delivery] = await take(phones.bus, EVENTS_QUEUE, 1)
    body: dict[str, Any] = json.loads(delivery.body)
    return body


async def send(phones: Phones, request: ReplyRequest) -> dict[str, Any]:
    """Publish a reply request as a ticket system does; its outcome event."""
    await phones.bus.publish(OUTBOUND, request.channel, request, message_id=request.id)
    return await event(phones)


async def test_whatsapp_from_a_known_phone_reaches_their_team(
    make_phones: AppFactory, fake_twilio: FakeTwilioApi
) -> None:
    """A customer registered by phone is recognised on WhatsApp: their team gets it, the
    sender is the E.164 number, and Twilio's retry is published once."""
    phones = await make_phones()
    params = whatsapp("SM" + "1" * 32)
    first = await phones.twilio("/webhooks/twilio/sms", params)
    assert first.status_code == 200, first.text
    again = await phones.twilio("/webhooks/twilio/sms", params)
    assert (again.status_code, again.text) == (200, first.text)
    async with running(phones, senders(fake_twilio)):
        key, message = await routed(phones)
    assert key == "team.t-istanbul"
    assert message.route.reason == "dedicated_team"
    assert message.customer is not None
    assert message.customer.id == "c-acme"
    inbound = message.message
    assert (inbound.channel, inbound.external_id) == ("whatsapp", params["MessageSid"])
    assert (inbound.sender.kind, inbound.sender.address) == ("phone", ACME_PHONE)
    assert inbound.sender.name == "Acme Ops"
    assert inbound.recipient is not None
    assert inbound.recipient.address == WHATSAPP_FROM
    assert inbound.meta["wa_id"] == "905321112233"
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)
    assert b'omniroute_messages_in_total{channel="whatsapp"} 1.0' in phones.metrics.render()


async def test_media_and_button_replies_travel_with_the_message(make_phones: AppFactory) -> None:
    """A photo arrives as an attachment URL; a quick-reply button says which button."""
    phones = await make_phones()
    media = "https://api.twilio.com/2010-04-01/Accounts/AC1/Messages/MM1/Media/ME1"
    photo = whatsapp(
        "MM" + "2" * 32,
        NumMedia="1",
        MediaUrl0=media,
        MediaContentType0="image/jpeg",
        MessageType="image",
        Body="",
    )
    button = whatsapp(
        "SM" + "3" * 32,
        MessageType="button",
        Body="Yes, call me",
        ButtonText="Yes, call me",
        ButtonPayload="callback-yes",
    )
    for params in (photo, button):
        assert (await phones.twilio("/webhooks/twilio/sms", params)).status_code == 200
    deliveries = await take(phones.bus, ROUTER_QUEUE, 2)
    messages = [InboundMessage.model_validate_json(d.body) for d in deliveries]
    got = {m.external_id: m for m in messages}
    taken = got[photo["MessageSid"]]
    assert [(a.content_type, a.url) for a in taken.attachments] == [("image/jpeg", media)]
    pressed = got[button["MessageSid"]]
    assert pressed.text == "Yes, call me"
    assert (pressed.meta["button_text"], pressed.meta["button_payload"]) == (
        "Yes, call me",
        "callback-yes",
    )


@pytest.mark.parametrize(
    ("pairs", "problem"),
    [
        ([*whatsapp("SM" + "4" * 32).items(), ("From", "whatsapp:+905321112244")], "'From'"),
        (list(whatsapp("SM" + "4" * 31 + "G").items()), "MessageSid"),
        (list(whatsapp("WA" + "4" * 32).items()), "MessageSid"),
    ],
)
async def test_whatsapp_form_twilio_never_sends_is_refused(
    make_phones: AppFactory, pairs: list[tuple[str, str]], problem: str
) -> None:
    """Issue 13's refusals hold on WhatsApp: repeated parameters and malformed SIDs are
    forgeries even when signed."""
    from tests.twilio.test_twilio import post_form, signed_as_twilio

    phones = await make_phones()
    path = "/webhooks/twilio/sms"
    response = await post_form(phones, path, pairs, signed_as_twilio(path, pairs))
    assert response.status_code == 403, response.text
    assert problem in response.json()["detail"]
    unsigned = await phones.client.post(path, data=whatsapp("SM" + "5" * 32))
    assert unsigned.status_code == 403
    assert await phones.bus.queue_depth(ROUTER_QUEUE) == (0, 0)


async def test_reply_goes_out_as_whatsapp_and_the_next_message_goes_to_that_agent(
    make_phones: AppFactory, fake_twilio: FakeTwilioApi
) -> None:
    """The agent who answered on WhatsApp keeps the customer (``last_agent``)."""
    phones = await make_phones()
    async with running(phones, senders(fake_twilio, whatsapp_from=WHATSAPP_FROM)):
        sent = await send(phones, reply("reply-wa-1", "whatsapp"))
        assert (sent["type"], sent["channel"]) == ("outbound.sent", "whatsapp"), sent
        assert sent["external_id"] == "SM" + "a" * 32
        [form] = fake_twilio.requests
        assert (form["To"], form["From"], form["Body"]) == (
            f"whatsapp:{ACME_PHONE}",
            f"whatsapp:{WHATSAPP_FROM}",
            "We are on it",
        )
        assert form["StatusCallback"].startswith(f"{PUBLIC_URL}/webhooks/twilio/status?")

        response = await phones.twilio("/webhooks/twilio/sms", whatsapp("SM" + "6" * 32))
        assert response.status_code == 200
        key, message = await routed(phones)
    assert key == "agent.a-ayse"
    assert (message.route.kind, message.route.reason) == ("agent", "last_agent")


@pytest.mark.parametrize(
    ("answered_on", "then"),
    [("sms", "whatsapp"), ("whatsapp", "sms")],
)
async def test_the_agent_keeps_the_customer_across_sms_and_whatsapp(
    make_phones: AppFactory, fake_twilio: FakeTwilioApi, answered_on: Channel, then: str
) -> None:
    """One customer, one phone number: whichever of the two the agent answered on, the next
    message on the other reaches that agent."""
    phones = await make_phones()
    async with running(phones, senders(fake_twilio)):
        sent = await send(phones, reply(f"reply-{answered_on}", answered_on))
        assert sent["type"] == "outbound.sent", sent
        [form] = fake_twilio.requests
        prefix = "whatsapp:" if answered_on == "whatsapp" else ""
        # without twilio.whatsapp_from, WhatsApp goes out from the SMS number
        assert (form["To"], form["From"]) == (f"{prefix}{ACME_PHONE}", f"{prefix}{SMS_FROM}")
        params = whatsapp("SM" + "7" * 32) if then == "whatsapp" else sms("SM" + "7" * 32)
        assert (await phones.twilio("/webhooks/twilio/sms", params)).status_code == 200
        key, message = await routed(phones)
    assert message.message.channel == then
    assert (key, message.route.reason) == ("agent.a-ayse", "last_agent")


async def test_outside_the_session_window_is_outbound_failed_outside_session_window(
    make_phones: AppFactory, fake_twilio: FakeTwilioApi
) -> None:
    """Twilio refuses free-form WhatsApp 24 hours after the customer's last message (error
    63016): the ticket system hears ``outside_session_window`` and can send a template."""
    phones = await make_phones()
    fake_twilio.closed_sessions.add(f"whatsapp:{ACME_PHONE}")
    async with running(phones, senders(fake_twilio)):
        failed = await send(phones, reply("reply-late", "whatsapp"))
    assert (failed["type"], failed["request_id"], failed["channel"]) == (
        "outbound.failed",
        "reply-late",
        "whatsapp",
    )
    assert failed["reason"] == "outside_session_window"
    assert failed["agent_id"] == "a-ayse"


async def test_whatsapp_sender_errors(fake_twilio: FakeTwilioApi) -> None:
    """63016 is permanent with its stable code; anything not a phone number is refused
    before Twilio is asked."""
    [_, sender] = senders(fake_twilio)
    fake_twilio.closed_sessions.add(f"whatsapp:{ACME_PHONE}")
    try:
        with pytest.raises(PermanentSendError, match="63016") as refused:
            await sender.send(reply("r-1", "whatsapp"), ReplyContext())
        assert refused.value.code == "outside_session_window"
        with pytest.raises(PermanentSendError, match="not a phone number"):
            await sender.send(reply("r-2", "whatsapp", "client:alice"), ReplyContext())
        # a ticket system that kept Twilio's prefix in the address is understood
        fake_twilio.closed_sessions.clear()
        prefixed = reply("r-3", "whatsapp", f"whatsapp:{ACME_PHONE}")
        result = await sender.send(prefixed, ReplyContext())
        assert result.external_id == "SM" + "a" * 32
        assert fake_twilio.requests[-1]["To"] == f"whatsapp:{ACME_PHONE}"
    finally:
        await sender.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("code", "reason"),
    [("63016", "outside_session_window"), ("63003", "twilio undelivered (error 63003")],
)
async def test_whatsapp_status_callback_failure_is_outbound_failed_on_whatsapp(
    make_phones: AppFactory, code: str, reason: str
) -> None:
    """A WhatsApp reply that fails after Twilio took it is reported on channel whatsapp."""
    phones = await make_phones()
    params = {
        "MessageSid": "SM" + "8" * 32,
        "SmsSid": "SM" + "8" * 32,
        "MessageStatus": "undelivered",
        "SmsStatus": "undelivered",
        "ErrorCode": code,
        "ChannelPrefix": "whatsapp",
        "AccountSid": ACCOUNT_SID,
        "From": f"whatsapp:{WHATSAPP_FROM}",
        "To": f"whatsapp:{ACME_PHONE}",
        "ApiVersion": "2010-04-01",
    }
    query = "request_id=reply-wa-9&agent_id=a-ayse"
    response = await phones.twilio("/webhooks/twilio/status", params, query=query)
    assert response.status_code == 204
    body = await event(phones)
    assert (body["type"], body["channel"], body["request_id"]) == (
        "outbound.failed",
        "whatsapp",
        "reply-wa-9",
    )
    assert body["reason"].startswith(reason)
    read = {k: v for k, v in params.items() if k != "ErrorCode"}
    read |= {"MessageStatus": "read", "SmsStatus": "read"}
    assert (await phones.twilio("/webhooks/twilio/status", read, query=query)).status_code == 204
    assert await phones.bus.queue_depth(EVENTS_QUEUE) == (0, 0)
