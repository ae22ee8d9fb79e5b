"""Deciding where a call goes, and recording it: what the PBX route API and the Twilio voice
webhook share, free of any web framework.

Invariants:
- A dial string goes straight into a dialplan, so only strings matching ``DIAL_PATTERN``
  (letters, digits and ``+ : @ . _ / -``, at most 128) are ever answered, whatever the
  directory holds. An unsafe target is replaced by the default dial (itself checked), else
  the dial is empty.
- The decision never waits for the broker; the call is recorded (``CallRecorder``) after
  the answer, and a failed publish is logged, not answered.
- Only the route is decided (``context=False``): the caller's recent contacts travel in
  the routed voice message, so no routing state is read for a call on a channel that is
  not sticky (voice is not, by default).
"""

import asyncio
import re
import time
import uuid
from typing import Literal

import structlog
from pydantic import BaseModel

from ingest.errors import TransientError
from ingest.identities import InvalidIdentity, is_withheld_caller, normalise_phone, redact
from ingest.metrics import Metrics
from ingest.protocols import Decider, Decision, InboundSink
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
        async with asyncio.timeout(timeout):
            return (await decider.decide_many([message], context=False))[0]
    except (TransientError, TimeoutError) as exc:
        error = str(exc) or f"no decision within {timeout}s"
        log.warning("call.decider_unavailable", error=error[:300])
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


class NoDecision(Exception):
    """No decision can be taken now and there is no default dial: answered 503."""


class CallRouter:
    """Answers "where does this caller go" for the route API: the message the call
    becomes, the policy's decision made safe for a dialplan, the log line and metrics."""

    def __init__(
        self,
        *,
        decider: Decider,
        metrics: Metrics,
        region: str,
        default_dial: str | None,
        decide_timeout: float,
    ) -> None:
        self._decider = decider
        self._metrics = metrics
        self._region = region
        self.default_dial = safe_dial(default_dial)
        self._timeout = decide_timeout

    def message(
        self, caller: str, called: str | None, call_id: str | None, verstat: str | None = None
    ) -> InboundMessage:
        """The voice message a call becomes (``caller`` non-blank). ``verstat`` is the
        carrier's STIR/SHAKEN verdict, kept as ``meta.stir_verstat`` like Twilio's."""
        meta: dict[str, object] = {"source": "pbx", "withheld": is_withheld_caller(caller)}
        verdict = "".join(c for c in (verstat or "")[:MAX_FIELD] if c.isprintable()).strip()
        if verdict:
            meta["stir_verstat"] = verdict
        return InboundMessage(
            channel="voice",
            external_id=call_id or f"pbx:{uuid.uuid4()}",
            sender=phone_identity(caller, self._region),
            recipient=phone_identity(called, self._region) if called else None,
            meta=meta,
        )

    async def answer(self, message: InboundMessage) -> tuple[RouteAnswer, float]:
        """The answer, and how long the decision took (ms) for ``log``."""
        started = time.perf_counter()
        decision = await decide_call(
            self._decider,
            message,
            withheld=bool(message.meta["withheld"]),
            default_dial=self.default_dial,
            timeout=self._timeout,
        )
        if decision is None:
            raise NoDecision("no routing decision can be taken now")
        elapsed = time.perf_counter() - started
        self._metrics.decision_seconds.observe(elapsed)
        route = decision.route
        dial = safe_dial(decision.dial)
        if decision.dial is not None and dial is None:
            log.warning("pbx.unsafe_dial", kind=route.kind, target=route.target)
        answer = RouteAnswer(
            customer=decision.customer,
            route=RouteOut(kind=route.kind, target=route.target, reason=route.reason),
            dial=dial or self.default_dial,
            fallback_dial=safe_dial(decision.fallback_dial),
        )
        return answer, round(elapsed * 1000, 2)

    @staticmethod
    def log(message: InboundMessage, answer: RouteAnswer, ms: float) -> None:
        """The answer's log line; written after the answer is sent (see ``PbxRoutes``)."""
        log.info(
            "pbx.route",
            caller=redact(message.sender.address),
            kind=answer.route.kind,
            target=answer.route.target,
            reason=answer.route.reason,
            ms=ms,
        )


class CallRecorder:
    """Publishes the calls the route API answered as voice ``InboundMessage``s.

    Off the answer's path: ``record`` runs after the response is sent. It returns once
    its call is published (broker-confirmed or spooled) or given up, so a graceful stop,
    which waits for the requests in flight, waits for it too. The calls answered while a
    batch is being published go out together in the next one.

    A PBX asking again about the same call (a dialplan retry) is answered again but not
    published twice: the last ``remember`` call ids are kept in memory. That is only to
    spare the broker: the router's claim on (channel, external id) is what guarantees a
    call is routed once, across restarts and instances, so no database write is made here.
    """

    def __init__(
        self,
        sink: InboundSink,
        metrics: Metrics,
        *,
        max_batch: int = 256,
        remember: int = 65536,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._max = max_batch
        self._remember = remember
        self._recent: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self._pending: list[tuple[InboundMessage, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def record(self, message: InboundMessage) -> None:
        call_id = message.external_id
        if call_id in self._recent:
            return
        self._recent[call_id] = None
        if len(self._recent) > self._remember:
            del self._recent[next(iter(self._recent))]
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="pbx-call-records")
        await future

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            try:
                await self._publish([message for message, _ in batch])
            finally:
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)

    async def _publish(self, messages: list[InboundMessage]) -> None:
        results = await asyncio.gather(
            *(self._sink.submit(message) for message in messages), return_exceptions=True
        )
        published = 0
        for message, result in zip(messages, results, strict=True):
            if isinstance(result, BaseException):
                # forgotten, so that the PBX asking again about this call publishes it
                self._recent.pop(message.external_id, None)
                log.warning(
                    "pbx.publish_failed", call_id=message.external_id, error=str(result)[:300]
                )
            else:
                published += 1
        if published:
            self._metrics.messages_in.labels("voice").inc(published)
