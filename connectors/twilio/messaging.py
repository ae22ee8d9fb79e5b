"""The Messaging webhook: a text becomes an ``InboundMessage`` (channel ``sms``, or
``whatsapp`` when From is ``whatsapp:+…``; sender the E.164 number either way, so a customer
known by phone is known on WhatsApp; ``external_id`` = MessageSid, media as attachments,
WhatsApp's profile name and button replies kept), answered with empty TwiML or, to an SMS,
``twilio.sms_ack_text``. Answered 200 only once the sink made it safe (broker confirm or
spool fsync), else 503 so that Twilio retries; a MessageSid seen before is answered again,
not published again."""

from datetime import UTC, datetime

import structlog
from fastapi import HTTPException, Response
from starlette.datastructures import FormData
from twilio.twiml.messaging_response import MessagingResponse

from connectors.calls import MAX_FIELD, phone_identity
from connectors.settings import TwilioSettings
from connectors.twilio import addresses, forms
from ingest.dedup import OnceSink
from ingest.errors import TransientError
from ingest.identities import redact
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.twilio")

SMS_META = {
    "AccountSid": "account_sid",
    "MessagingServiceSid": "messaging_service_sid",
    "FromCountry": "from_country",
    "NumSegments": "num_segments",
}
WHATSAPP_META = {
    "ProfileName": "profile_name",
    "WaId": "wa_id",
    "MessageType": "message_type",
    "ButtonText": "button_text",
    "ButtonPayload": "button_payload",
}


class MessagingWebhook:
    """``POST /webhooks/twilio/sms``, after the form was verified."""

    def __init__(self, settings: TwilioSettings, intake: OnceSink, *, region: str) -> None:
        self._settings = settings
        self._intake = intake
        self._region = region

    def message(self, form: FormData) -> InboundMessage:
        channel, sender = addresses.split(forms.required(form, "From"))
        whatsapp = channel == "whatsapp"
        _, to = addresses.split(forms.text(form, "To").strip())
        name = forms.text(form, "ProfileName")[:MAX_FIELD] if whatsapp else ""
        return InboundMessage(
            channel=channel,
            external_id=forms.required(form, "MessageSid"),
            sender=phone_identity(sender, self._region, name=name or None),
            recipient=phone_identity(to, self._region) if to else None,
            # a button reply's Body is its text; ButtonText says so when Body is empty
            text=forms.text(form, "Body") or (forms.text(form, "ButtonText") if whatsapp else ""),
            attachments=forms.media(form),
            meta=forms.meta(form, SMS_META | (WHATSAPP_META if whatsapp else {})),
        )

    async def answer(self, form: FormData) -> Response:
        message = self.message(form)
        fresh = await self._intake.first_time(message.channel, message.external_id)
        if fresh:
            try:
                await self._intake.submit(message)
            except TransientError as exc:
                log.warning(
                    "twilio.sms_not_safe", external_id=message.external_id, error=str(exc)[:300]
                )
                raise HTTPException(503, "the message could not be stored, retry") from exc
            log.info(
                "twilio.sms",
                channel=message.channel,
                external_id=message.external_id,
                sender=redact(message.sender.address),
                media=len(message.attachments),
            )
        else:
            log.info("twilio.duplicate", channel=message.channel, external_id=message.external_id)
        # A retry means Twilio missed our first answer, so the retry gets the same one.
        reply = MessagingResponse()
        ack = self._settings.sms_ack_text
        ackable = bool(ack) and message.channel == "sms" and message.sender.address[:1] == "+"
        if ackable and (not fresh or await self._acknowledge_today(message.sender.address)):
            reply.message(ack)
        return forms.twiml(reply)

    async def _acknowledge_today(self, sender: str) -> bool:
        """One acknowledgement per sender per UTC day: two auto-responders answering each
        other must not loop (DESIGN.md, Bad input). A store that is down sends none."""
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        try:
            return await self._intake.seen.first_time("sms-ack", f"{sender}:{day}")
        except TransientError:
            return False
