"""The Voice webhook: the router's decision as TwiML ``<Dial>`` (or ``<Enqueue>`` for
``queue:NAME``); when an agent is dialled, the Dial ``action`` comes back here with
``?fallback=<team dial>`` and dials the team unless the agent answered. The call is
published as an ``InboundMessage`` (channel ``voice``, ``external_id`` = CallSid). A call is
always answered, even when its publish fails; a CallSid seen before is not published again.
"""

import asyncio
import time
from typing import Any
from urllib.parse import quote

import structlog
from fastapi import HTTPException, Response
from starlette.datastructures import FormData
from twilio.twiml.voice_response import VoiceResponse

from connectors.calls import MAX_FIELD, decide_call, phone_identity, safe_dial
from connectors.settings import TwilioSettings
from connectors.twilio import forms
from ingest.dedup import OnceSink
from ingest.errors import TransientError
from ingest.identities import is_withheld_caller, redact
from ingest.metrics import Metrics
from ingest.protocols import Decider, Decision
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.twilio")

ANSWERED = frozenset({"completed", "answered"})
NOBODY = "Sorry, nobody can take your call right now. Please try again later."
VOICE_META = {
    "CallerName": "caller_name",
    "StirVerstat": "stir_verstat",
    "CallStatus": "call_status",
    "Direction": "direction",
    "ForwardedFrom": "forwarded_from",
    "AccountSid": "account_sid",
}


class VoiceWebhook:
    """``POST /webhooks/twilio/voice``, after the form was verified; ``action_url`` is where
    Twilio posts the Dial's outcome (this webhook, as seen from outside)."""

    def __init__(
        self,
        settings: TwilioSettings,
        intake: OnceSink,
        decider: Decider,
        metrics: Metrics,
        *,
        region: str,
        action_url: str,
    ) -> None:
        self._settings = settings
        self._intake = intake
        self._decider = decider
        self._metrics = metrics
        self._region = region
        self._action_url = action_url
        self._default_dial = safe_dial(settings.default_dial)

    def after_dial(self, form: FormData, fallback: str) -> Response:
        """The Dial action: hang up if the agent answered, else dial the fallback."""
        reply = VoiceResponse()
        if forms.text(form, "DialCallStatus") in ANSWERED:
            reply.hangup()
        else:
            target = safe_dial(fallback) or self._default_dial
            _connect(reply, target, self._settings.dial_timeout, None)
        return forms.twiml(reply)

    async def answer(self, form: FormData) -> Response:
        caller = forms.required(form, "From")
        caller_name = forms.text(form, "CallerName")[:MAX_FIELD] or None
        message = InboundMessage(
            channel="voice",
            external_id=forms.required(form, "CallSid"),
            sender=phone_identity(caller, self._region, name=caller_name),
            recipient=forms.optional_identity(form, "To", self._region),
            meta=forms.meta(form, VOICE_META),
        )
        started = time.perf_counter()
        publishing = asyncio.create_task(self._publish(message), name="twilio-publish-call")
        try:
            decision = await decide_call(
                self._decider,
                message,
                withheld=is_withheld_caller(caller),
                default_dial=self._default_dial,
                timeout=self._settings.decide_timeout,
            )
        finally:
            await asyncio.shield(publishing)
        self._metrics.decision_seconds.observe(time.perf_counter() - started)
        if decision is None:
            raise HTTPException(503, "no routing decision can be taken now")
        target, fallback_target = _targets(decision, self._default_dial)
        action = None
        if fallback_target and fallback_target != target:
            action = f"{self._action_url}?fallback={quote(fallback_target)}"
        reply = VoiceResponse()
        _connect(reply, target, self._settings.dial_timeout, action)
        log.info(
            "twilio.call",
            external_id=message.external_id,
            caller=redact(message.sender.address),
            kind=decision.route.kind,
            target=decision.route.target,
            reason=decision.route.reason,
            fallback=bool(action),
        )
        return forms.twiml(reply)

    async def _publish(self, message: InboundMessage) -> None:
        if not await self._intake.first_time("voice", message.external_id):
            log.info("twilio.duplicate", channel="voice", external_id=message.external_id)
            return
        try:
            await self._intake.submit(message)
        except TransientError as exc:  # the caller is still connected; Twilio will not retry
            log.error(
                "twilio.call_not_published", external_id=message.external_id, error=str(exc)[:300]
            )


def _targets(decision: Decision, default_dial: str | None) -> tuple[str | None, str | None]:
    """The safe dial string and its fallback; an unsafe or missing one is the default."""
    target = safe_dial(decision.dial)
    if decision.dial is not None and target is None:
        log.warning("twilio.unsafe_dial", kind=decision.route.kind, target=decision.route.target)
    fallback = safe_dial(decision.fallback_dial) if decision.route.kind == "agent" else None
    if target is None:
        target, fallback = fallback or default_dial, None
    return target, fallback


def _connect(reply: VoiceResponse, target: str | None, timeout: int, action: str | None) -> None:
    """``<Dial>`` to a number, ``sip:`` URI or ``client:`` identity; ``queue:NAME`` enqueues."""
    if target is None:
        reply.say(NOBODY)
        reply.hangup()
        return
    lowered = target.casefold()
    if lowered.startswith("queue:"):
        reply.enqueue(target[6:])
        return
    options: dict[str, Any] = {"timeout": timeout}
    if action is not None:
        options.update(action=action, method="POST")
    dial = reply.dial(**options)
    if lowered.startswith(("sip:", "sips:")):
        dial.sip(target)
    elif lowered.startswith("client:"):
        dial.client(target[7:])
    else:
        dial.number(target)
