"""Caller-ID routing for any PBX: ``GET|POST /v1/route?caller=&called=&call_id=``.

Sole purpose: Asterisk, FreeSWITCH, Kamailio and others ask where to connect a caller and
get the router's decision in milliseconds, as JSON or as a bare dial string
(``Accept: text/plain`` or ``format=text``) fit for ``Dial(${CURL(...)})``.

Invariants:
- Bearer ``api.token``, compared in constant time; no token configured means every request
  is refused (401), never an open endpoint.
- A dial string goes straight into a dialplan, so only strings matching ``DIAL_PATTERN``
  (letters, digits and ``+ : @ . _ / -``, at most 128) are ever answered, whatever the
  directory holds. An unsafe target is replaced by ``api.default_dial`` (itself checked),
  else the dial is empty (``null`` in JSON, an empty body in text).
- The decision never waits for the broker: the call is published as a voice
  ``InboundMessage`` after the answer is sent, and a failed publish is logged, not answered.
"""

import asyncio
import contextlib
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Query, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from connectors.settings import ApiSettings
from ingest.errors import TransientError
from ingest.identities import InvalidIdentity, is_withheld_caller, normalise_phone, redact
from ingest.metrics import Metrics
from ingest.protocols import Decider, Decision, InboundSink, SeenStore
from ingest.schema import CustomerRef, Identity, InboundMessage, Route

log = structlog.get_logger("omniroute.pbx")

DIAL_PATTERN = re.compile(r"[A-Za-z0-9+:@._/-]{1,128}")
MAX_FIELD = 256


def safe_dial(value: str | None) -> str | None:
    """``value`` when it is a dial string no dialplan can misread, else None."""
    if value is None:
        return None
    value = value.strip()
    return value if DIAL_PATTERN.fullmatch(value) else None


def phone_identity(address: str, region: str, *, name: str | None = None) -> Identity:
    """E.164 when the text is a phone number, else the text made printable (``client:x``,
    ``sip:…``, an alphanumeric sender id): readable, never an error."""
    text = "".join(c for c in address if c.isprintable()).strip()[:MAX_FIELD]
    try:
        normalised = normalise_phone(text, region)
    except InvalidIdentity:
        normalised = " ".join(text.split()) or "unknown"
    return Identity(kind="phone", address=normalised, name=name)


def fixed_decision(reason: str, dial: str | None) -> Decision:
    """A decision taken without the policy: withheld caller, decider unavailable."""
    return Decision(customer=None, route=Route(kind="triage", reason=reason), dial=dial)


async def decide_call(
    decider: Decider,
    message: InboundMessage,
    *,
    withheld: bool,
    default_dial: str | None,
    timeout: float,
) -> Decision | None:
    """The policy's decision for a call, or the default target when the caller is withheld
    or the decider fails; None when it fails and there is no default target."""
    if withheld and default_dial:
        return fixed_decision("withheld_caller", default_dial)
    try:
        async with deadline(timeout):
            return await decider(message)
    except TransientError as exc:
        log.warning("call.decider_unavailable", error=str(exc)[:300])
        if default_dial is None:
            return None
        return fixed_decision("decider_unavailable", default_dial)


class RouteOut(BaseModel):
    kind: Literal["agent", "team", "triage"]
    target: str | None
    reason: str


class RouteAnswer(BaseModel):
    """The caller-ID decision; ``dial`` is what to connect the caller to (or null)."""

    customer: CustomerRef | None
    route: RouteOut
    dial: str | None
    fallback_dial: str | None


_bearer = HTTPBearer(auto_error=False, description="api.token")


def pbx_router(
    *,
    settings: ApiSettings,
    decider: Decider,
    sink: InboundSink,
    metrics: Metrics,
    region: str,
    seen: SeenStore | None = None,
) -> APIRouter:
    """``/v1/route``; ``region`` is the routing default region for national numbers."""
    router = APIRouter(tags=["pbx"])
    default_dial = safe_dial(settings.default_dial)
    token = settings.token.get_secret_value().encode() if settings.token else None

    async def authorised(  # async: a sync dependency would cost a thread-pool hop per call
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if token is None or not hmac.compare_digest(given, token):
            raise HTTPException(
                401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"}
            )

    async def first_time(call_id: str) -> bool:
        """A broken dedup store must not lose the call: publish, the router deduplicates."""
        try:
            return seen is None or await seen.first_time("voice", call_id)
        except TransientError as exc:
            log.warning("pbx.seen_store_unavailable", error=str(exc)[:300])
            return True

    async def publish(message: InboundMessage) -> None:
        try:
            if not await first_time(message.external_id):
                return
            try:
                await sink.submit(message)
            except BaseException:
                if seen is not None:
                    with contextlib.suppress(TransientError):
                        await seen.forget("voice", message.external_id)
                raise
        except TransientError as exc:
            log.warning("pbx.publish_failed", call_id=message.external_id, error=str(exc)[:300])
            return
        metrics.messages_in.labels("voice").inc()

    async def route(
        request: Request,
        background: BackgroundTasks,
        caller: Annotated[str | None, Query(max_length=MAX_FIELD)] = None,
        called: Annotated[str | None, Query(max_length=MAX_FIELD)] = None,
        call_id: Annotated[str | None, Query(max_length=MAX_FIELD)] = None,
        format: Annotated[Literal["json", "text"] | None, Query()] = None,
    ) -> Response:
        params: dict[str, Any] = {"caller": caller, "called": called, "call_id": call_id}
        if request.method == "POST" and _is_form(request):
            form = await request.form()
            for key in params:
                value = form.get(key)
                if params[key] is None and isinstance(value, str):
                    params[key] = value[:MAX_FIELD]
        caller_text = (params["caller"] or "").strip()
        if not caller_text:
            raise HTTPException(400, "missing caller")
        started = time.perf_counter()
        withheld = is_withheld_caller(caller_text)
        message = InboundMessage(
            channel="voice",
            external_id=params["call_id"] or f"pbx:{uuid.uuid4()}",
            sender=phone_identity(caller_text, region),
            recipient=phone_identity(params["called"], region) if params["called"] else None,
            meta={"source": "pbx", "withheld": withheld},
        )
        decision = await decide_call(
            decider,
            message,
            withheld=withheld,
            default_dial=default_dial,
            timeout=settings.decide_timeout,
        )
        if decision is None:
            raise HTTPException(503, "no routing decision can be taken now")
        metrics.decision_seconds.observe(time.perf_counter() - started)
        dial = safe_dial(decision.dial)
        if decision.dial is not None and dial is None:
            log.warning("pbx.unsafe_dial", kind=decision.route.kind, target=decision.route.target)
            dial = default_dial
        elif dial is None:
            dial = default_dial
        log.info(
            "pbx.route",
            caller=redact(message.sender.address),
            kind=decision.route.kind,
            target=decision.route.target,
            reason=decision.route.reason,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
        background.add_task(publish, message)
        accept = request.headers.get("accept", "")
        if format == "text" or (format is None and accept.startswith("text/plain")):
            return PlainTextResponse(dial or "")
        answer = RouteAnswer(
            customer=decision.customer,
            route=RouteOut(
                kind=decision.route.kind, target=decision.route.target, reason=decision.route.reason
            ),
            dial=dial,
            fallback_dial=safe_dial(decision.fallback_dial),
        )
        return Response(answer.model_dump_json(), media_type="application/json")

    for method in ("GET", "POST"):
        router.add_api_route(
            "/v1/route",
            route,
            methods=[method],
            operation_id=f"route_call_{method.lower()}",
            summary="Where to connect a caller",
            description="Parameters in the query string, or for POST also as an "
            "application/x-www-form-urlencoded body. JSON by default; only the dial string "
            "(possibly empty) with `Accept: text/plain` or `format=text`.",
            response_model=RouteAnswer,
            responses={
                200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
                400: {"description": "missing caller"},
                401: {"description": "missing or wrong bearer token"},
                503: {"description": "no decision possible and no api.default_dial"},
            },
            dependencies=[Depends(authorised)],
        )
    return router


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded")


@contextlib.asynccontextmanager
async def deadline(seconds: float) -> AsyncIterator[None]:
    """``asyncio.timeout`` whose expiry reads as a ``TransientError``."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as exc:
        raise TransientError(f"no decision within {seconds}s") from exc
