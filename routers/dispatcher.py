"""The outbound dispatcher: ``omniroute.outbound`` in, a channel's sender out.

Sole purpose: hand each ``ReplyRequest`` to the sender ``config`` registered for its channel,
then remember who answered whom (last agent, and for email the Message-ID as thread owner)
and say so with ``outbound.sent``; a reply that cannot be sent ends as ``outbound.failed``
with the reason. A request id already sent is never sent again: a redelivery only repeats
the ``outbound.sent`` event.

A request is checked, not believed (``routers.trust``): one from a publisher outside
``events.trusted_publishers`` is dead-lettered unread and unanswered; one naming an agent
the directory does not have is dead-lettered and answered with ``outbound.failed``. Its
recorded time is omniroute's own clock, so it has no date to doubt.

An acknowledgement (issue 16, ``routers.acks``) is a request omniroute published itself:
header ``x-omniroute-ack`` under omniroute's own broker ``user_id`` (the header from anyone
else is ignored, and the request checked like any other). It is sent as an automatic
answer (``ReplyContext.auto_reply``: ``Auto-Submitted: auto-replied`` on a mail), never to
a message marked as a bounce or an auto-reply, and recorded only as sent: nobody becomes
the customer's last agent or the thread's owner, and no assignment or timer ends.
"""

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.backoff import Backoff
from ingest.bus import Bus
from ingest.consume import QueueWorker
from ingest.consumers import Consumer, Needs, QueueConsumer
from ingest.errors import (
    AuthError,
    ConfigError,
    PermanentSendError,
    RefusedError,
    TransientError,
)
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.protocols import ReplyContext, Sender, SendResult
from ingest.schema import InboundMessage, OutboundFailed, OutboundSent, ReplyRequest, utcnow
from ingest.topology import EVENTS, OUTBOUND_QUEUE
from routers import directory, state
from routers.acks import ACK_HEADER
from routers.models import SentReply
from routers.settings import DispatchSettings, EventsSettings, RoutingSettings
from routers.store import routed_log, sent_replies
from routers.store.engine import sessionmaker
from routers.trust import check_agent, check_publisher

log = structlog.get_logger("omniroute.dispatcher")


class OutboundDispatcher(QueueWorker):
    name = "dispatcher"
    queue = OUTBOUND_QUEUE

    def __init__(
        self,
        *,
        bus: Bus,
        engine: AsyncEngine,
        senders: Mapping[str, Sender],
        routing: RoutingSettings,
        settings: DispatchSettings,
        health: Health,
        metrics: Metrics | None = None,
        trust: EventsSettings | None = None,
    ) -> None:
        super().__init__(bus, prefetch=settings.prefetch, health=health, metrics=metrics)
        #: replaced as a whole on reload, like ``routing``
        self.trust = trust or EventsSettings()
        self._sending: set[str] = set()  # request ids being sent by this process right now
        self._sessions = sessionmaker(engine)
        self._senders = dict(senders)
        self.routing = routing
        self._settings = settings

    def _consumer_for(
        self, needs: Needs, channel: AbstractChannel, queue: AbstractQueue
    ) -> QueueConsumer[Any]:
        return Consumer(needs, channel, queue, self.handle)

    async def handle(self, delivery: AbstractIncomingMessage) -> None:
        # before reading it: a stranger hears nothing back, not even outbound.failed
        check_publisher(self.trust, delivery.user_id, self._bus.user)
        try:
            reply = ReplyRequest.model_validate_json(delivery.body)
        except ValidationError as exc:
            await self._refuse(delivery.body, exc)
            raise  # dead-lettered with the reason by the consumer
        own = self._bus.user is not None and delivery.user_id == self._bus.user
        ack = own and bool((delivery.headers or {}).get(ACK_HEADER))
        structlog.contextvars.bind_contextvars(message_id=reply.id, channel=reply.channel)
        try:
            await self._dispatch(reply, ack=ack)
        finally:
            structlog.contextvars.unbind_contextvars("message_id", "channel")

    async def _dispatch(self, reply: ReplyRequest, *, ack: bool = False) -> None:
        # Two copies of one request in flight at once (a ticket system that published
        # twice) would both pass the "already sent?" check: the second waits its turn.
        if reply.id in self._sending:
            raise TransientError(f"request {reply.id} is being sent already")
        self._sending.add(reply.id)
        try:
            await self._dispatch_once(reply, ack)
        finally:
            self._sending.discard(reply.id)

    async def _dispatch_once(self, reply: ReplyRequest, ack: bool) -> None:
        try:
            async with self._sessions() as session:
                if not ack:  # an acknowledgement's agent_id is omniroute's own, no agent
                    await check_agent(session, reply.agent_id)
                sent = await session.get(SentReply, reply.id)
                found = (
                    await routed_log.find_routed(session, reply.in_reply_to)
                    if reply.in_reply_to
                    else None
                )
                customer_id = found[1] if found else None
                if customer_id is None:
                    customer = await directory.find_customer(
                        session, reply.to, self.routing.default_region
                    )
                    customer_id = customer.id if customer else None
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc
        except RefusedError as exc:
            # the ticket system waits for an outcome of its request id: tell it, then the
            # consumer dead-letters the request with the same reason
            event = OutboundFailed(
                request_id=reply.id, channel=reply.channel, agent_id=reply.agent_id, reason=str(exc)
            )
            await self._bus.publish(EVENTS, event.type, event, message_id=f"failed:{reply.id}")
            raise
        if sent is not None:
            log.info("dispatcher.already_sent")
            await self._announce(reply, SendResult(external_id=sent.external_id))
            return

        sender = self._senders.get(reply.channel)
        if sender is None:
            await self._fail(reply, f"no sender is configured for channel {reply.channel}")
            return
        original = found[0] if found else None
        if ack and original is not None and _automatic(original):
            log.warning("dispatcher.ack_dropped", why="the message is automatic")
            return  # never answer an automatic message automatically (RFC 3834)
        context = ReplyContext(original=original, customer_id=customer_id, auto_reply=ack)
        try:
            result = await self._send_with_retries(sender, reply, context)
        except PermanentSendError as exc:
            await self._fail(reply, exc.code or f"{type(exc).__name__}: {exc}", detail=str(exc))
            return
        except (AuthError, ConfigError) as exc:
            await self._fail(reply, f"{type(exc).__name__}: {exc}")
            return
        except TransientError as exc:
            await self._fail(reply, f"gave up after {self._settings.attempts} attempts: {exc}")
            return

        now = utcnow()
        try:
            async with self._sessions.begin() as session:
                await sent_replies.record_sent(
                    session, reply.id, reply.channel, result.external_id, now
                )
                if not ack:  # an acknowledgement is nobody's answer
                    await state.record_reply(
                        session,
                        agent_id=reply.agent_id,
                        customer_id=customer_id,
                        channel=reply.channel,
                        at=now,
                        message_id=result.thread_message_id,
                        answers=found[0].id if found else None,
                    )
        except SQLAlchemyError as exc:
            # Sent but not recorded: a redelivery would send it twice. Say so loudly; the
            # broker requeues and the send is retried (at-least-once).
            log.error("dispatcher.record_failed", error=str(exc))
            raise TransientError(f"directory database: {exc}") from exc
        await self._announce(reply, result)
        if self._metrics is not None:
            self._metrics.outbound.labels(reply.channel, "sent").inc()
        log.info("dispatcher.sent", agent_id=reply.agent_id, customer=customer_id, ack=ack)

    async def _send_with_retries(
        self, sender: Sender, reply: ReplyRequest, context: ReplyContext
    ) -> SendResult:
        backoff = Backoff(self._settings.base_delay, self._settings.max_delay)
        for attempt in range(1, self._settings.attempts + 1):
            try:
                return await sender.send(reply, context)
            except TransientError as exc:
                if attempt == self._settings.attempts:
                    raise
                log.warning("dispatcher.retry", attempt=attempt, error=str(exc))
                await asyncio.sleep(backoff.next())
        raise AssertionError("unreachable")

    async def _announce(self, reply: ReplyRequest, result: SendResult) -> None:
        event = OutboundSent(
            request_id=reply.id,
            channel=reply.channel,
            agent_id=reply.agent_id,
            external_id=result.external_id,
        )
        await self._bus.publish(EVENTS, event.type, event, message_id=f"sent:{reply.id}")

    async def _refuse(self, body: bytes, exc: ValidationError) -> None:
        """Tell the ticket system its request was unreadable, when it carries an id at all:
        otherwise it would wait for an outcome that never comes."""
        try:
            loose = json.loads(body)
        except (ValueError, RecursionError):  # garbage, or nested past the parser's depth
            return
        if not isinstance(loose, dict) or not isinstance(loose.get("id"), str):
            return
        agent = loose.get("agent_id")
        event = OutboundFailed(
            request_id=loose["id"][:512],
            channel=str(loose.get("channel", "?"))[:16],
            agent_id=agent[:200] if isinstance(agent, str) else None,
            reason=f"invalid reply request: {exc.error_count()} error(s), "
            f"first: {exc.errors()[0]['msg'] if exc.errors() else '?'}",
        )
        await self._bus.publish(EVENTS, event.type, event, message_id=f"failed:{event.request_id}")

    async def _fail(self, reply: ReplyRequest, reason: str, *, detail: str | None = None) -> None:
        log.warning("dispatcher.failed", reason=reason, detail=detail)
        if self._metrics is not None:
            self._metrics.outbound.labels(reply.channel, "failed").inc()
        event = OutboundFailed(
            request_id=reply.id, channel=reply.channel, agent_id=reply.agent_id, reason=reason
        )
        await self._bus.publish(EVENTS, event.type, event, message_id=f"failed:{reply.id}")


def _automatic(message: InboundMessage) -> bool:
    """A bounce or an auto-reply, as the email connector marked it (``connectors.email.mime``)."""
    return bool(message.meta.get("bounce") or message.meta.get("auto_reply"))
