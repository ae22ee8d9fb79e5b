"""Status callbacks of the messages we sent (SMS, or WhatsApp when To is ``whatsapp:+…``):
``failed``/``undelivered`` become ``outbound.failed`` events on that channel, through the
``EventSink`` (issue 14: not straight onto the bus)."""

import uuid

import structlog
from fastapi import HTTPException, Response
from starlette.datastructures import FormData

from connectors.twilio import addresses, forms
from ingest.errors import TransientError
from ingest.metrics import Metrics
from ingest.protocols import EventSink
from ingest.schema import OutboundFailed

log = structlog.get_logger("omniroute.twilio")

FAILED_STATUSES = frozenset({"failed", "undelivered"})


class StatusCallbacks:
    """``POST /webhooks/twilio/status``, after the form was verified. One event id per
    (message, status), so Twilio's repeated callbacks deduplicate downstream; 503 when the
    event could not be made safe, so that Twilio retries."""

    def __init__(self, events: EventSink, metrics: Metrics) -> None:
        self._events = events
        self._metrics = metrics

    async def answer(
        self, form: FormData, *, request_id: str | None, agent_id: str | None
    ) -> Response:
        sid = forms.required(form, "MessageSid")
        channel, _ = addresses.split(forms.text(form, "To") or forms.text(form, "From"))
        state = forms.text(form, "MessageStatus")
        if state not in FAILED_STATUSES:
            return Response(status_code=204)
        code = forms.text(form, "ErrorCode") or "none"
        event = OutboundFailed(
            request_id=request_id or sid,
            channel=channel,
            agent_id=agent_id or None,
            reason=addresses.ERROR_REASONS.get(code)
            or f"twilio {state} (error {code[:20]}, message {sid[:64]})",
        )
        event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"twilio:{sid}:{state}"))
        try:
            await self._events.emit(event, message_id=event_id)
        except TransientError as exc:
            log.warning("twilio.status_not_published", error=str(exc)[:300])
            raise HTTPException(503, "the event could not be published, retry") from exc
        self._metrics.outbound.labels(channel, state).inc()
        log.info(
            "twilio.sms_failed",
            channel=channel,
            external_id=sid,
            status=state,
            error_code=code[:20],
        )
        return Response(status_code=204)
