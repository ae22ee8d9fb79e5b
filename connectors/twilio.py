"""Twilio: SMS and Voice webhooks in, SMS replies out, delivery failures as events.

Webhooks (``twilio_router``):
- ``POST /webhooks/twilio/sms``: a text becomes an ``InboundMessage`` (channel ``sms``,
  ``external_id`` = MessageSid, media as attachments); answered with empty TwiML or
  ``twilio.sms_ack_text``.
- ``POST /webhooks/twilio/voice``: the router's decision as TwiML ``<Dial>`` (or
  ``<Enqueue>`` for ``queue:NAME``); when an agent is dialled, the Dial ``action`` comes back
  here with ``?fallback=<team dial>`` and dials the team unless the agent answered. The call
  is published as an ``InboundMessage`` (channel ``voice``, ``external_id`` = CallSid).
- ``POST /webhooks/twilio/status``: SMS status callbacks; ``failed``/``undelivered`` become
  ``outbound.failed`` events on ``omniroute.events``.

Invariants: every request is checked with twilio's ``RequestValidator`` against
``http.public_url`` + path + query (403 otherwise, also when no auth token is configured),
then refused (403) unless shaped as Twilio sends it: no repeated parameter, SIDs of
Twilio's format, the configured ``account_sid`` (the signature alone does not bind these);
an SMS is answered 200 only once the sink made it safe (broker confirm or spool fsync), else
503 so that Twilio retries; a MessageSid or CallSid seen before is answered again, not
published again. A call is always answered, even when its publish fails.
"""

import asyncio
import base64
import logging
import re
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import aiohttp
import structlog
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from starlette.datastructures import FormData
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.request_validator import (
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)
from twilio.rest import Client
from twilio.twiml.messaging_response import MessagingResponse
from twilio.twiml.voice_response import VoiceResponse

from connectors.calls import MAX_FIELD, decide_call, phone_identity, safe_dial
from connectors.settings import HttpSettings, TwilioSettings
from ingest.bus import EVENTS, Bus
from ingest.errors import AuthError, ConfigError, PermanentSendError, TransientError
from ingest.identities import is_withheld_caller, redact
from ingest.metrics import Metrics
from ingest.protocols import (
    Decider,
    Decision,
    InboundSink,
    ReplyContext,
    SeenStore,
    SendResult,
)
from ingest.schema import Attachment, InboundMessage, OutboundFailed, ReplyRequest

log = structlog.get_logger("omniroute.twilio")

SMS_PATH = "/webhooks/twilio/sms"
VOICE_PATH = "/webhooks/twilio/voice"
STATUS_PATH = "/webhooks/twilio/status"
FAILED_STATUSES = frozenset({"failed", "undelivered"})
ANSWERED = frozenset({"completed", "answered"})
MAX_MEDIA = 10  # Twilio sends at most 10 media items per message
NOBODY = "Sorry, nobody can take your call right now. Please try again later."
SMS_META = {
    "AccountSid": "account_sid",
    "MessagingServiceSid": "messaging_service_sid",
    "FromCountry": "from_country",
    "NumSegments": "num_segments",
}
VOICE_META = {
    "CallerName": "caller_name",
    "StirVerstat": "stir_verstat",
    "CallStatus": "call_status",
    "Direction": "direction",
    "ForwardedFrom": "forwarded_from",
    "AccountSid": "account_sid",
}
#: Twilio's documented SID shapes: two letters naming the resource, 32 lowercase hex digits
SID_FORMATS = {
    "MessageSid": re.compile(r"(SM|MM)[0-9a-f]{32}"),
    "CallSid": re.compile(r"CA[0-9a-f]{32}"),
    "AccountSid": re.compile(r"AC[0-9a-f]{32}"),
}
_quiet = ("twilio.http_client", "twilio.async_http_client")
SignatureHeader = Annotated[
    str | None,
    Header(alias="X-Twilio-Signature", description="HMAC of the URL and parameters"),
]


def _form_body(*required: str) -> dict[str, Any]:
    """The OpenAPI request body of a Twilio webhook (FastAPI cannot see a raw form)."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {name: _form_field(name) for name in required},
                        "required": list(required),
                        "additionalProperties": {"type": "string"},
                    }
                }
            },
        }
    }


def _form_field(name: str) -> dict[str, Any]:
    sid = SID_FORMATS.get(name)
    return {"type": "string"} | ({"pattern": f"^{sid.pattern}$"} if sid else {})


_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/xml": {}}, "description": "TwiML"},
    400: {"description": "a required parameter is missing"},
    403: {
        "description": "missing or invalid X-Twilio-Signature, or a form Twilio never sends: "
        "a repeated parameter, a malformed SID, another account's AccountSid"
    },
    503: {"description": "the message could not be made safe; Twilio retries"},
}


def twilio_router(
    *,
    settings: TwilioSettings,
    http: HttpSettings,
    sink: InboundSink,
    seen: SeenStore,
    decider: Decider,
    bus: Bus,
    metrics: Metrics,
    region: str,
) -> APIRouter:
    """The three webhooks; ``bus`` carries ``outbound.failed`` events, ``region`` is the
    routing default region for national numbers."""
    router = APIRouter(tags=["twilio"])
    validator = (
        RequestValidator(settings.auth_token.get_secret_value()) if settings.auth_token else None
    )
    default_dial = safe_dial(settings.default_dial)

    async def verified(request: Request, signature: str | None, sid: str) -> FormData:
        """The form, once signed by Twilio and shaped as Twilio sends it; ``sid`` names the
        endpoint's own SID parameter (``MessageSid`` or ``CallSid``)."""
        urlencoded = request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        )
        form = await request.form() if urlencoded else FormData()
        if validator is None or not signature:
            raise HTTPException(403, "missing X-Twilio-Signature")
        url = str(request.url)
        if http.public_url:
            url = http.public_url + request.url.path
            if request.url.query:
                url += "?" + request.url.query
        algorithm = get_signature_algorithm(request.headers.get(SIGNATURE_SETTINGS_HEADER))
        if not validator.validate(url, form, signature, algorithm):
            log.warning("twilio.bad_signature", path=request.url.path)
            raise HTTPException(403, "invalid X-Twilio-Signature")
        problem = _not_as_twilio_sends(form, sid, settings.account_sid)
        if problem is not None:
            log.warning("twilio.refused_form", path=request.url.path, problem=problem)
            raise HTTPException(403, f"not a request Twilio sends: {problem}")
        return form

    async def first_time(channel: str, external_id: str) -> bool:
        """A broken dedup store must not lose input: publish, the router deduplicates too."""
        try:
            return await seen.first_time(channel, external_id)
        except TransientError as exc:
            log.warning("twilio.seen_store_unavailable", error=str(exc)[:300])
            return True

    async def submit(message: InboundMessage) -> None:
        """Make the message safe or raise ``TransientError``; undo the dedup mark then."""
        try:
            await sink.submit(message)
        except BaseException:
            try:
                await seen.forget(message.channel, message.external_id)
            except TransientError as exc:
                log.warning("twilio.forget_failed", error=str(exc)[:300])
            raise
        metrics.messages_in.labels(message.channel).inc()

    @router.post(
        SMS_PATH,
        summary="Incoming SMS/MMS",
        responses=_RESPONSES,
        openapi_extra=_form_body("From", "MessageSid"),
    )
    async def sms(request: Request, signature: SignatureHeader = None) -> Response:
        form = await verified(request, signature, "MessageSid")
        message = InboundMessage(
            channel="sms",
            external_id=_required(form, "MessageSid"),
            sender=phone_identity(_required(form, "From"), region),
            recipient=_optional_identity(form, "To", region),
            text=_text(form, "Body"),
            attachments=_media(form),
            meta=_meta(form, SMS_META),
        )
        fresh = await first_time("sms", message.external_id)
        if fresh:
            try:
                await submit(message)
            except TransientError as exc:
                log.warning(
                    "twilio.sms_not_safe", external_id=message.external_id, error=str(exc)[:300]
                )
                raise HTTPException(503, "the message could not be stored, retry") from exc
            log.info(
                "twilio.sms",
                external_id=message.external_id,
                sender=redact(message.sender.address),
                media=len(message.attachments),
            )
        else:
            log.info("twilio.duplicate", channel="sms", external_id=message.external_id)
        # A retry means Twilio missed our first answer, so the retry gets the same one.
        reply = MessagingResponse()
        ackable = bool(settings.sms_ack_text) and message.sender.address.startswith("+")
        if ackable and (not fresh or await acknowledge_today(message.sender.address)):
            reply.message(settings.sms_ack_text)
        return _twiml(reply)

    async def acknowledge_today(sender: str) -> bool:
        """One acknowledgement per sender per UTC day: two auto-responders answering each
        other must not loop (DESIGN.md, Bad input). A store that is down sends none."""
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        try:
            return await seen.first_time("sms-ack", f"{sender}:{day}")
        except TransientError:
            return False

    async def publish_call(message: InboundMessage) -> None:
        if not await first_time("voice", message.external_id):
            log.info("twilio.duplicate", channel="voice", external_id=message.external_id)
            return
        try:
            await submit(message)
        except TransientError as exc:  # the caller is still connected; Twilio will not retry
            log.error(
                "twilio.call_not_published", external_id=message.external_id, error=str(exc)[:300]
            )

    @router.post(
        VOICE_PATH,
        summary="Incoming call, or the Dial action of a fallback",
        responses=_RESPONSES,
        openapi_extra=_form_body("From", "CallSid"),
    )
    async def voice(
        request: Request,
        signature: SignatureHeader = None,
        fallback: Annotated[
            str | None,
            Query(max_length=MAX_FIELD, description="set by omniroute on its Dial action"),
        ] = None,
    ) -> Response:
        form = await verified(request, signature, "CallSid")
        reply = VoiceResponse()
        if fallback is not None:
            if _text(form, "DialCallStatus") in ANSWERED:
                reply.hangup()
            else:
                _connect(reply, safe_dial(fallback) or default_dial, settings.dial_timeout, None)
            return _twiml(reply)
        caller = _required(form, "From")
        caller_name = _text(form, "CallerName")[:MAX_FIELD] or None
        message = InboundMessage(
            channel="voice",
            external_id=_required(form, "CallSid"),
            sender=phone_identity(caller, region, name=caller_name),
            recipient=_optional_identity(form, "To", region),
            meta=_meta(form, VOICE_META),
        )
        withheld = is_withheld_caller(caller)
        started = time.perf_counter()
        publishing = asyncio.create_task(publish_call(message), name="twilio-publish-call")
        try:
            decision = await decide_call(
                decider,
                message,
                withheld=withheld,
                default_dial=default_dial,
                timeout=settings.decide_timeout,
            )
        finally:
            await asyncio.shield(publishing)
        metrics.decision_seconds.observe(time.perf_counter() - started)
        if decision is None:
            raise HTTPException(503, "no routing decision can be taken now")
        target, fallback_target = _targets(decision, default_dial)
        action = None
        if fallback_target and fallback_target != target:
            action = f"{http.public_url or ''}{VOICE_PATH}?fallback={quote(fallback_target)}"
        _connect(reply, target, settings.dial_timeout, action)
        log.info(
            "twilio.call",
            external_id=message.external_id,
            caller=redact(message.sender.address),
            kind=decision.route.kind,
            target=decision.route.target,
            reason=decision.route.reason,
            fallback=bool(action),
        )
        return _twiml(reply)

    @router.post(
        STATUS_PATH,
        summary="SMS status callback",
        status_code=204,
        responses=_RESPONSES,
        openapi_extra=_form_body("MessageSid", "MessageStatus"),
    )
    async def status(
        request: Request,
        signature: SignatureHeader = None,
        request_id: Annotated[str | None, Query(max_length=512)] = None,
        agent_id: Annotated[str | None, Query(max_length=200)] = None,
    ) -> Response:
        form = await verified(request, signature, "MessageSid")
        sid = _required(form, "MessageSid")
        state = _text(form, "MessageStatus")
        if state not in FAILED_STATUSES:
            return Response(status_code=204)
        code = _text(form, "ErrorCode") or "none"
        event = OutboundFailed(
            request_id=request_id or sid,
            channel="sms",
            agent_id=agent_id or None,
            reason=f"twilio {state} (error {code[:20]}, message {sid[:64]})",
        )
        # One id per (message, status): Twilio's repeated callbacks deduplicate downstream.
        event_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"twilio:{sid}:{state}"))
        try:
            await bus.publish(EVENTS, "outbound.failed", event, message_id=event_id)
        except TransientError as exc:
            log.warning("twilio.status_not_published", error=str(exc)[:300])
            raise HTTPException(503, "the event could not be published, retry") from exc
        metrics.outbound.labels("sms", state).inc()
        log.info("twilio.sms_failed", external_id=sid, status=state, error_code=code[:20])
        return Response(status_code=204)

    return router


def _not_as_twilio_sends(form: FormData, sid: str, account_sid: str | None) -> str | None:
    """Why a signed form cannot be one Twilio sent, or None.

    The signature does not bind a form's shape: it is an HMAC of the URL followed by name +
    value for every value, names sorted, a repeated name's values deduplicated and sorted
    (twilio's ``RequestValidator``), with no separator. So a captured request can be re-cut
    and keep its signature: a text whose Body ends in ``From<victim>`` re-sent with that
    Body cut short and ``From=<sender>&From=<victim>`` hashes the same, and Starlette reads
    the last From; a value can take in the next parameter (``MessageSid=<sid>NumMedia0``
    without ``NumMedia`` is a new MessageSid, past the dedup). Twilio never repeats a name
    (media are ``MediaUrl0``, ``MediaUrl1``…) and its SIDs have one documented shape, so
    anything else is refused (403, as a forgery: Twilio does not retry a 4xx either way).
    """
    counts = Counter(name for name, _ in form.multi_items())
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        return f"parameter {repeated[0][:40]!r} given more than once"
    for name, pattern in ((sid, SID_FORMATS[sid]), ("AccountSid", SID_FORMATS["AccountSid"])):
        value = _text(form, name)
        if value and not pattern.fullmatch(value):
            return f"{name} is not a Twilio SID"
    if account_sid and _text(form, "AccountSid") not in ("", account_sid):
        return "AccountSid is not twilio.account_sid"
    return None


def _text(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


def _required(form: FormData, name: str) -> str:
    value = _text(form, name).strip()
    if not value:
        raise HTTPException(400, f"missing {name}")
    if len(value) > MAX_FIELD:
        raise HTTPException(400, f"{name} is longer than {MAX_FIELD} characters")
    return value


def _optional_identity(form: FormData, name: str, region: str) -> Any:
    value = _text(form, name).strip()
    return phone_identity(value, region) if value else None


def _meta(form: FormData, names: dict[str, str]) -> dict[str, Any]:
    return {key: _text(form, name)[:MAX_FIELD] for name, key in names.items() if _text(form, name)}


def _media(form: FormData) -> list[Attachment]:
    try:
        count = min(int(_text(form, "NumMedia") or 0), MAX_MEDIA)
    except ValueError:
        count = 0
    media = []
    for i in range(max(count, 0)):
        url = _text(form, f"MediaUrl{i}")
        if url.startswith(("https://", "http://")):
            kind = _text(form, f"MediaContentType{i}") or "application/octet-stream"
            media.append(Attachment(content_type=kind[:200], size=0, url=url[:2048]))
    return media


def _twiml(reply: VoiceResponse | MessagingResponse) -> Response:
    return Response(str(reply), media_type="application/xml")


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


# --- SMS out ------------------------------------------------------------------------------


class _HostRewritingClient(AsyncTwilioHttpClient):  # type: ignore[misc]  # twilio is untyped
    """twilio's aiohttp client, sending to ``base`` (scheme, host, port, path prefix)
    instead of Twilio's host: a loopback fake API in tests, a proxy in production."""

    def __init__(self, base: str | None, timeout: float) -> None:
        super().__init__(timeout=timeout, logger=logging.getLogger("twilio.async_http_client"))
        self._base = urlsplit(base) if base else None
        self._timeout = timeout

    async def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        if self._base is not None:
            parts = urlsplit(url)
            url = urlunsplit(
                parts._replace(
                    scheme=self._base.scheme,
                    netloc=self._base.netloc,
                    path=self._base.path.rstrip("/") + parts.path,
                )
            )
        kwargs["timeout"] = kwargs.get("timeout") or self._timeout
        auth = kwargs.pop("auth", None)
        if auth is not None:  # aiohttp deprecates BasicAuth objects, which twilio would build
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            kwargs["headers"] = {**(kwargs.get("headers") or {}), "Authorization": f"Basic {token}"}
        return await super().request(method, url, *args, **kwargs)


class TwilioSmsSender:
    """The outbound dispatcher's ``Sender`` for channel ``sms``, through twilio's async API.

    4xx answers are permanent (``PermanentSendError``; 401/403 ``AuthError``), 429, 5xx and
    network failures transient. With ``http.public_url`` set, every message asks for status
    callbacks, so a later delivery failure still becomes an ``outbound.failed`` event.
    """

    channel = "sms"

    def __init__(
        self, settings: TwilioSettings, http: HttpSettings, *, region: str
    ) -> None:
        if not (settings.account_sid and settings.auth_token and settings.from_number):
            raise ConfigError("twilio: account_sid, auth_token and from_number are required")
        for name in _quiet:  # twilio logs every request at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self._settings = settings
        self._public_url = http.public_url
        self._region = region
        self._client: Any = None
        self._http: _HostRewritingClient | None = None

    def _api(self) -> Any:
        if self._client is None:
            settings = self._settings
            assert settings.auth_token is not None
            self._http = _HostRewritingClient(settings.api_base_url, settings.send_timeout)
            self._client = Client(
                settings.account_sid,
                settings.auth_token.get_secret_value(),
                http_client=self._http,
                environment={},  # never TWILIO_* from the process environment
            )
        return self._client

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        to = phone_identity(reply.to.address, self._region).address
        if not to.startswith("+"):
            raise PermanentSendError(f"not a phone number: {redact(to)}")
        options: dict[str, Any] = {
            "to": to,
            "from_": self._settings.from_number,
            "body": reply.text,
        }
        if self._public_url:
            query = urlencode({"request_id": reply.id, "agent_id": reply.agent_id})
            options["status_callback"] = f"{self._public_url}{STATUS_PATH}?{query}"
        try:
            async with asyncio.timeout(self._settings.send_timeout + 1):
                sent = await self._api().messages.create_async(**options)
        except TwilioRestException as exc:
            _, error = _classify(exc)  # outcomes are counted once, by the dispatcher
            raise error from exc
        except (TimeoutError, aiohttp.ClientError, OSError, TwilioException) as exc:
            raise TransientError(f"twilio API unreachable: {type(exc).__name__}") from exc
        log.info("twilio.sms_sent", request_id=reply.id, external_id=sent.sid, to=redact(to))
        return SendResult(external_id=sent.sid, extra={"status": str(sent.status)})

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        self._http = None
        self._client = None


def _classify(exc: TwilioRestException) -> tuple[str, Exception]:
    status = int(exc.status)
    what = f"twilio error {exc.code} (HTTP {status}): {exc.msg}"
    if status in (401, 403):
        return "auth_error", AuthError(what)
    if status == 429 or status >= 500:
        return "transient_error", TransientError(what)
    return "permanent_error", PermanentSendError(what)
