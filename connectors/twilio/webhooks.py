"""Twilio's webhooks as one FastAPI router: ``TwilioRoutes``.

- ``POST /webhooks/twilio/sms``: the Messaging webhook (``messaging``).
- ``POST /webhooks/twilio/voice``: the Voice webhook and its Dial action (``voice``).
- ``POST /webhooks/twilio/status``: status callbacks of our replies (``status``).

Every request is verified first (``forms.SignedForms``: signature, then the form's shape).
"""

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from connectors.calls import MAX_FIELD
from connectors.settings import HttpSettings, TwilioSettings
from connectors.twilio.forms import RESPONSES, SignatureHeader, SignedForms, form_body
from connectors.twilio.messaging import MessagingWebhook
from connectors.twilio.sms import STATUS_PATH
from connectors.twilio.status import StatusCallbacks
from connectors.twilio.voice import VoiceWebhook
from ingest.dedup import OnceSink
from ingest.metrics import Metrics
from ingest.protocols import Decider, EventSink, InboundSink, SeenStore

SMS_PATH = "/webhooks/twilio/sms"
VOICE_PATH = "/webhooks/twilio/voice"


class TwilioRoutes:
    """The three webhooks: ``router`` for FastAPI. ``events`` carries ``outbound.failed``
    events, ``region`` is the routing default region for national numbers."""

    def __init__(
        self,
        *,
        settings: TwilioSettings,
        http: HttpSettings,
        sink: InboundSink,
        seen: SeenStore,
        decider: Decider,
        events: EventSink,
        metrics: Metrics,
        region: str,
    ) -> None:
        self._forms = SignedForms(settings, http)
        intake = OnceSink(sink, seen, name="twilio", open_on_outage=True, metrics=metrics)
        self._messaging = MessagingWebhook(settings, intake, region=region)
        self._voice = VoiceWebhook(
            settings,
            intake,
            decider,
            metrics,
            region=region,
            action_url=f"{http.public_url or ''}{VOICE_PATH}",
        )
        self._status = StatusCallbacks(events, metrics)
        self.router = APIRouter(tags=["twilio"])
        self.router.add_api_route(
            SMS_PATH,
            self.sms,
            methods=["POST"],
            summary="Incoming SMS/MMS or WhatsApp message",
            responses=RESPONSES,
            openapi_extra=form_body("From", "MessageSid"),
        )
        self.router.add_api_route(
            VOICE_PATH,
            self.voice,
            methods=["POST"],
            summary="Incoming call, or the Dial action of a fallback",
            responses=RESPONSES,
            openapi_extra=form_body("From", "CallSid"),
        )
        self.router.add_api_route(
            STATUS_PATH,
            self.status,
            methods=["POST"],
            summary="SMS or WhatsApp status callback",
            status_code=204,
            responses=RESPONSES,
            openapi_extra=form_body("MessageSid", "MessageStatus"),
        )

    async def sms(self, request: Request, signature: SignatureHeader = None) -> Response:
        form = await self._forms.verified(request, signature, "MessageSid")
        return await self._messaging.answer(form)

    async def voice(
        self,
        request: Request,
        signature: SignatureHeader = None,
        fallback: Annotated[
            str | None,
            Query(max_length=MAX_FIELD, description="set by omniroute on its Dial action"),
        ] = None,
    ) -> Response:
        form = await self._forms.verified(request, signature, "CallSid")
        if fallback is not None:
            return self._voice.after_dial(form, fallback)
        return await self._voice.answer(form)

    async def status(
        self,
        request: Request,
        signature: SignatureHeader = None,
        request_id: Annotated[str | None, Query(max_length=512)] = None,
        agent_id: Annotated[str | None, Query(max_length=200)] = None,
    ) -> Response:
        form = await self._forms.verified(request, signature, "MessageSid")
        return await self._status.answer(form, request_id=request_id, agent_id=agent_id)
