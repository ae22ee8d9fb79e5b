"""The router worker: ``omniroute.router`` in, ``omniroute.routed`` out, acked after the confirm.

Per message: validate, normalise the sender again (publishers make mistakes), drop a
channel id already routed, decide, publish the ``RoutedMessage`` with key
``team.<id>`` / ``agent.<id>`` / ``triage``, record it, and only then ack. A crash
anywhere before the ack redelivers the message; one after the publish but before the
record can route it twice, which consumers absorb by ``message_id``.

Claims of messages in flight together are written in one transaction (``ClaimBatch``):
one commit for many messages, and no two transactions of this process fighting for
SQLite's single write lock.
"""

import asyncio
import time
from typing import Any

import structlog
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

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


class ClaimBatch:
    """Claims channel ids for the messages in flight, many per transaction.

    A claim waits only while an earlier batch is being written: the first message of a
    quiet period is written at once, alone, and whatever arrives meanwhile goes into the
    next transaction together. If a batch fails, each of its claims is retried in a
    transaction of its own, so one bad row only fails its own message.
    """

    def __init__(self, sessions: async_sessionmaker[Any], max_batch: int) -> None:
        self._sessions = sessions
        self._max = max_batch
        self._pending: list[tuple[RoutedMessage, asyncio.Future[str]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def claim(self, routed: RoutedMessage) -> str:
        """The omniroute id that owns this message's channel id once committed."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((routed, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[: self._max], self._pending[self._max :]
            outcomes: list[str | Exception]
            try:
                try:
                    outcomes = list(await self._commit([routed for routed, _ in batch]))
                except SQLAlchemyError:
                    if len(batch) == 1:
                        raise
                    # one bad row fails only its own message: each alone, as before batching
                    outcomes = [await self._alone(routed) for routed, _ in batch]
            except asyncio.CancelledError:
                _fail([*batch, *self._pending], TransientError("directory database: cancelled"))
                self._pending = []
                raise
            except SQLAlchemyError as exc:
                outcomes = [_transient(exc)]
            except Exception as exc:  # a bug: each handler raises it and dead-letters, as before
                outcomes = [exc] * len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)

    async def _commit(self, batch: list[RoutedMessage]) -> list[str]:
        async with self._sessions.begin() as session:
            return await state.claim_routed_many(session, batch)

    async def _alone(self, routed: RoutedMessage) -> str | Exception:
        try:
            return (await self._commit([routed]))[0]
        except SQLAlchemyError as exc:
            return _transient(exc)
        except Exception as exc:
            return exc


def _transient(exc: SQLAlchemyError) -> TransientError:
    error = TransientError(f"directory database: {exc}")
    error.__cause__ = exc
    return error


def _fail(batch: list[tuple[RoutedMessage, "asyncio.Future[str]"]], exc: Exception) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(exc)


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
        self._claims = ClaimBatch(sessionmaker(engine), max_batch=settings.prefetch)
        self._decider = decider
        self.routing = routing
        self._settings = settings
        self._health = health
        self.routed = 0
        self.duplicates = 0

    async def run(self, stop: asyncio.Event, *, drain_timeout: float = 30.0) -> None:
        """Consume until ``stop`` is set, then finish in-flight messages and return."""
        await self._bus.consume_until(
            ROUTER_QUEUE,
            self.handle,
            stop,
            prefetch=self._settings.prefetch,
            component=self.name,
            health=self._health,
            drain_timeout=drain_timeout,
        )

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
        claimant = await self._claims.claim(routed)
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
