"""The router worker: ``omniroute.router`` in, ``omniroute.routed`` out, acked after the confirm.

Per message: validate, normalise the sender again (publishers make mistakes), drop a
channel id already routed, decide, publish the ``RoutedMessage`` with key
``team.<id>`` / ``agent.<id>`` / ``triage``, record it, and only then ack. A crash
anywhere before the ack redelivers the message; one after the publish but before the
record can route it twice, which consumers absorb by ``message_id``.
"""

import asyncio
import time

import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import ROUTED, ROUTER_QUEUE, Bus
from ingest.errors import TransientError
from ingest.health import Health
from ingest.identities import InvalidIdentity, normalise
from ingest.metrics import Metrics
from ingest.protocols import Decider
from ingest.schema import InboundMessage, RoutedMessage
from routers import state
from routers.db import sessionmaker
from routers.settings import RouterSettings, RoutingSettings

log = structlog.get_logger("omniroute.router")


class RouterWorker:
    name = "router"

    def __init__(
        self,
        *,
        bus: Bus,
        engine: AsyncEngine,
        decider: Decider,
        routing: RoutingSettings,
        settings: RouterSettings,
        health: Health,
        metrics: Metrics | None = None,
    ) -> None:
        self._bus = bus
        self._metrics = metrics
        self._sessions = sessionmaker(engine)
        self._decider = decider
        self.routing = routing
        self._settings = settings
        self._health = health
        self.routed = 0
        self.duplicates = 0

    async def run(self, stop: asyncio.Event, *, drain_timeout: float = 30.0) -> None:
        """Consume until ``stop`` is set, then finish in-flight messages and return."""
        consumer = await self._bus.consumer(
            ROUTER_QUEUE, self.handle, prefetch=self._settings.prefetch
        )
        await consumer.start()
        self._health.set(self.name, "up")
        try:
            await stop.wait()
        finally:
            self._health.set(self.name, "stopped", "draining")
            await asyncio.shield(consumer.stop(drain_timeout))

    async def handle(self, delivery: AbstractIncomingMessage) -> None:
        message = InboundMessage.model_validate_json(delivery.body)
        structlog.contextvars.bind_contextvars(message_id=message.id, channel=message.channel)
        try:
            await self._route(message)
        finally:
            structlog.contextvars.unbind_contextvars("message_id", "channel")

    async def _route(self, message: InboundMessage) -> None:
        started = time.perf_counter()
        sender = message.sender
        try:
            message.sender = sender.model_copy(
                update={
                    "address": normalise(sender.kind, sender.address, self.routing.default_region)
                }
            )
        except InvalidIdentity:
            message.meta.setdefault("sender_unparsed", True)
        decided = time.perf_counter()
        decision = await self._decider(message)
        if self._metrics is not None:
            self._metrics.decision_seconds.observe(time.perf_counter() - decided)
        routed = RoutedMessage(message=message, customer=decision.customer, route=decision.route)
        # Claim the channel id before publishing: a copy under another omniroute id loses
        # the claim and is dropped, while a redelivery of this very message (same id, e.g.
        # after a crash before the ack) finds its own claim and is published again.
        try:
            async with self._sessions.begin() as session:
                claimant = await state.claim_routed(session, routed)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc
        if claimant != message.id:
            self.duplicates += 1
            log.info("router.duplicate", external_id=message.external_id, first=claimant)
            return
        await self._bus.publish(ROUTED, decision.route.routing_key, routed, message_id=message.id)
        self.routed += 1
        if self._metrics is not None:
            self._metrics.routed.labels(decision.route.reason, decision.route.kind).inc()
        log.info(
            "router.routed",
            sender=message.sender.address,  # redacted by the logging config unless log.redact=false
            customer=decision.customer.id if decision.customer else None,
            route=decision.route.routing_key,
            reason=decision.route.reason,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
