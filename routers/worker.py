"""The router worker: ``omniroute.router`` in, ``omniroute.routed`` out, acked after the confirm.

Per message: validate, normalise the sender again (publishers make mistakes), decide,
claim the channel id (a copy already routed under another id is dropped), publish the
``RoutedMessage`` with key ``team.<id>`` / ``agent.<id>`` / ``triage``, and only then
ack. A crash anywhere before the ack redelivers the message, which finds its own claim
and is published again; consumers absorb that copy by ``message_id``.

Messages are handled in the batches the consumer hands over (``ingest.batch_consumer.
BatchConsumer``): their facts are read together, their claims written in one
transaction (``ClaimBatch``: no two transactions of this process fight for SQLite's single
write lock), their publishes confirmed together, and they are acked with one frame.
"""

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.batch_consumer import BatchConsumer
from ingest.bus import Bus
from ingest.consume import QueueWorker
from ingest.consumers import Needs, QueueConsumer
from ingest.delivery import Delivery
from ingest.errors import PoisonError, TransientError
from ingest.health import Health
from ingest.identities import InvalidIdentity, normalise
from ingest.metrics import Metrics
from ingest.protocols import Decider, Decision
from ingest.recent import RecentDecisions
from ingest.schema import InboundMessage, RoutedMessage, utcnow
from ingest.topology import ROUTED, ROUTER_QUEUE
from routers import capacity
from routers.acks import Acknowledger
from routers.settings import RouterSettings, RoutingSettings
from routers.store.transactions import Transactions, transactions_of

log = structlog.get_logger("omniroute.router")

#: a message's claim: the id owning its channel id with the routed message as recorded (its
#: agent route sent to the team if the agent filled up meanwhile), or what the claim failed with
Claim = tuple[str, RoutedMessage] | BaseException


class ClaimBatch:
    """Claims channel ids for the messages in flight, many per transaction.

    A claim waits only while an earlier batch is being written: the first batch of a
    quiet period is written at once, and whatever arrives meanwhile goes into the next
    transaction together. If a transaction fails, each of its claims is retried in a
    transaction of its own, so one bad row only fails its own message.
    """

    def __init__(
        self, run: Transactions, max_batch: int, routing: Callable[[], RoutingSettings]
    ) -> None:
        self._run = run
        self._max = max_batch
        self._routing = routing  # the live settings: a reload changes them
        self._pending: list[tuple[list[RoutedMessage], asyncio.Future[list[Claim]]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def claim_many(self, batch: list[RoutedMessage]) -> list[Claim]:
        """For each message, the omniroute id that owns its channel id once committed, or
        the exception its claim failed with."""
        future: asyncio.Future[list[Claim]] = asyncio.get_running_loop().create_future()
        self._pending.append((batch, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await future

    async def _write(self) -> None:
        while self._pending:
            taken, size = 0, 0
            while taken < len(self._pending) and (taken == 0 or size < self._max):
                size += len(self._pending[taken][0])
                taken += 1
            group, self._pending = self._pending[:taken], self._pending[taken:]
            rows = [routed for batch, _ in group for routed in batch]
            try:
                outcomes = await self._outcomes(rows)
            except asyncio.CancelledError:
                failure = TransientError("directory database: cancelled")
                for batch, future in [*group, *self._pending]:
                    if not future.done():
                        future.set_result([failure] * len(batch))
                self._pending = []
                raise
            at = 0
            for batch, future in group:
                if not future.done():
                    future.set_result(outcomes[at : at + len(batch)])
                at += len(batch)

    async def _outcomes(self, rows: list[RoutedMessage]) -> list[Claim]:
        """Each row's claim. A row the database refuses (a constraint, a value) or a bug
        fails only its own message: the rows are then claimed one by one. Any other
        database error is an outage, and the whole batch waits it out together."""
        try:
            return list(await self._commit(rows))
        except (IntegrityError, DataError) as exc:
            refused: Exception = exc
        except SQLAlchemyError as exc:
            return [_transient(exc)] * len(rows)
        except Exception as exc:
            refused = exc
        if len(rows) == 1:
            return [_claim_failure(refused)]
        return [await self._alone(routed) for routed in rows]

    async def _commit(self, batch: list[RoutedMessage]) -> list[tuple[str, RoutedMessage]]:
        routing = self._routing()
        since, offers = utcnow() - routing.load_window, routing.offer_timeout
        return await self._run(lambda c: capacity.claim(c, batch, since, offers))

    async def _alone(self, routed: RoutedMessage) -> Claim:
        try:
            return (await self._commit([routed]))[0]
        except Exception as exc:
            return _claim_failure(exc)


def _claim_failure(exc: Exception) -> Exception:
    """What a claim that raised ``exc`` means for its message."""
    if isinstance(exc, (IntegrityError, DataError)):  # retrying cannot help this row
        return PoisonError(f"claim refused by the directory database: {exc.orig}")
    if isinstance(exc, SQLAlchemyError):
        return _transient(exc)
    return exc  # a bug: the handler's outcome dead-letters it with the reason


def _transient(exc: SQLAlchemyError) -> TransientError:
    error = TransientError(f"directory database: {exc}")
    error.__cause__ = exc
    return error


class RouterWorker(QueueWorker):
    name = "router"
    queue = ROUTER_QUEUE

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
        recent: RecentDecisions | None = None,
    ) -> None:
        super().__init__(bus, prefetch=settings.prefetch, health=health, metrics=metrics)
        self._recent = recent  # the status page's record (issue 17), when it is on
        self._claims = ClaimBatch(
            transactions_of(engine), max_batch=settings.prefetch, routing=lambda: self.routing
        )
        self._decider = decider
        self.routing = routing
        self._settings = settings
        self.routed = 0
        self.duplicates = 0
        #: called after a batch made offers (issue 16): the timer worker's nudge
        self.on_offer: Callable[[], None] | None = None
        #: called after a batch wrote a first answer due soon: the escalation worker's nudge
        self.on_wait: Callable[[], None] | None = None
        #: acknowledges new conversations once their routed publish is confirmed (issue 16,
        #: ``[ack]``); replaced as a whole on reload
        self.acks: Acknowledger | None = None

    def _consumer_for(
        self, needs: Needs, channel: AbstractChannel, queue: AbstractQueue
    ) -> QueueConsumer[Any]:
        # Two batches at a time. While one runs, the next starts once half the prefetch
        # window has arrived (or the first ends), so under a backlog each holds half the
        # window; with a limit of half the window, the next one started at a quarter of it,
        # and a batch's fixed cost (reads, claim, tasks) was paid twice as often.
        return BatchConsumer(
            needs,
            channel,
            queue,
            self.handle_batch,
            max_batch=max(1, self._prefetch),
            concurrency=2,
        )

    async def handle_batch(self, deliveries: list[Delivery]) -> list[BaseException | None]:
        """Route the deliveries that arrived together; one outcome per delivery (None: done,
        ack it). Their facts are read together and their claims written in one
        transaction; their publishes wait for their confirms together."""
        started = time.perf_counter()
        outcomes: list[BaseException | None] = [None] * len(deliveries)
        parsed: list[tuple[int, InboundMessage]] = []
        for index, delivery in enumerate(deliveries):
            try:
                parsed.append((index, self._parse(delivery.body)))
            except Exception as exc:  # poison (or a bug): only this message is dead-lettered
                outcomes[index] = exc
        decided = await self._decide(parsed, outcomes)
        if not decided:
            return outcomes
        if self._metrics is not None:
            elapsed = time.perf_counter() - started
            for _ in decided:
                self._metrics.decision_seconds.observe(elapsed)
        routed = [
            RoutedMessage(message=message, customer=decision.customer, route=decision.route)
            for _, message, decision in decided
        ]
        # Claim the channel ids before publishing: a copy under another omniroute id loses
        # the claim and is dropped, while a redelivery of this very message (same id, e.g.
        # after a crash before the ack) finds its own claim and is published again.
        claims = await self._claims.claim_many(routed)
        publishing: list[tuple[int, RoutedMessage]] = []
        for (index, message, _), claim in zip(decided, claims, strict=True):
            if isinstance(claim, BaseException):
                outcomes[index] = claim
                continue
            owner, item = claim
            if owner != message.id:
                self.duplicates += 1
                log.info(
                    "router.duplicate",
                    message_id=message.id,
                    channel=message.channel,
                    external_id=message.external_id,
                    first=owner,
                )
            else:
                publishing.append((index, item))
        results = await self._bus.publish_many(
            ROUTED,
            [(item.route.routing_key, item, item.message.id) for _, item in publishing],
        )
        offers = self.routing.offer_timeout
        offered = False
        confirmed: list[RoutedMessage] = []
        for (index, item), result in zip(publishing, results, strict=True):
            if result is not None:
                outcomes[index] = result
                continue
            self._routed(item, started)
            confirmed.append(item)
            offered = offered or (item.route.kind == "agent" and item.message.channel in offers)
        if self._metrics is not None:  # per label pair, not per message: labels() is costly
            by_route = Counter((item.route.reason, item.route.kind) for item in confirmed)
            for (reason, kind), count in by_route.items():
                self._metrics.routed.labels(reason, kind).inc(count)
        if offered and self.on_offer is not None:
            self.on_offer()  # the timer worker may be asleep past this offer's due time
        if self.on_wait is not None and capacity.due_soon(confirmed, {}):
            self.on_wait()  # a first answer due within the escalation worker's sleep
        acks = self.acks
        if acks is not None and confirmed:
            await acks.acknowledge(confirmed)  # bounded, and never raises (routers.acks)
        return outcomes

    async def _decide(
        self, parsed: list[tuple[int, InboundMessage]], outcomes: list[BaseException | None]
    ) -> list[tuple[int, InboundMessage, Decision]]:
        """Decide the batch at once; if that fails for a reason other than an outage, decide
        each message alone so that one message's failure is its own."""
        if not parsed:
            return []
        try:
            decisions = await self._decider.decide_many([message for _, message in parsed])
            return [(i, m, d) for (i, m), d in zip(parsed, decisions, strict=True)]
        except TransientError as exc:
            for index, _ in parsed:
                outcomes[index] = exc
            return []
        except Exception:
            if len(parsed) == 1:
                raise
        decided: list[tuple[int, InboundMessage, Decision]] = []
        for index, message in parsed:
            try:
                decided.append((index, message, (await self._decider.decide_many([message]))[0]))
            except Exception as exc:
                outcomes[index] = exc
        return decided

    def _parse(self, body: bytes) -> InboundMessage:
        """The message, its sender normalised again (publishers make mistakes)."""
        message = InboundMessage.model_validate_json(body)
        sender = message.sender
        try:
            address = normalise(sender.kind, sender.address, self.routing.default_region)
        except InvalidIdentity:
            message.meta.setdefault("sender_unparsed", True)
        else:
            if address != sender.address:
                message.sender = sender.model_copy(update={"address": address})
        return message

    def _routed(self, item: RoutedMessage, started: float) -> None:
        route = item.route
        self.routed += 1
        if self._recent is not None:
            self._recent.add(item)
        log.info(
            "router.routed",
            message_id=item.message.id,
            channel=item.message.channel,
            sender=item.message.sender.address,  # redacted unless log.redact=false
            customer=item.customer.id if item.customer else None,
            route=route.routing_key,
            reason=route.reason,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
