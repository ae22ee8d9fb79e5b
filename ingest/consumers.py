"""Consumers that ack a delivery only once its handler made it safe downstream.

``Consumer`` runs a handler per delivery; ``ingest.batch_consumer.BatchConsumer`` (the
router's) hands the deliveries that arrived together to one handler call. ``QueueConsumer``
is what both share; ``Needs`` is what they are given (they import neither the bus nor the
daemon); ``ingest.consume`` runs a worker's whole consuming life.

Both: a ``TransientError`` (broker, directory) is retried here with capped backoff for
``bus.transient_retry_for`` seconds before the message goes back to the queue, since
requeueing at once would spend the delivery limit in seconds and dead-letter good messages
during a short outage; poison (an invalid body, a ``PoisonError``) and handler bugs are
dead-lettered with the reason; a message is acked only after its handler returned.
"""

import abc
import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
)
from pydantic import ValidationError

from ingest.backoff import jittered, pause
from ingest.delivery import Received, Settleable
from ingest.errors import PoisonError, TransientError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.settings import BusSettings

log = structlog.get_logger("omniroute.bus")

TRANSIENT_RETRY_DELAY = 1.0
TRANSIENT_RETRY_MAX = 30.0
POISON = (PoisonError, ValidationError, json.JSONDecodeError, UnicodeDecodeError)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


M = TypeVar("M", bound=Settleable)


class DeadLetters(Protocol):
    """Where a refused message goes, with its reason (``ingest.bus.Bus``)."""

    async def dead_letter(self, message: Received, reason: str) -> None: ...


@dataclass(frozen=True)
class Needs:
    """What a consumer is given: where poison goes, the bus settings (retry window, the
    timeout of a broker call), and where it reports its health and dead letters."""

    dead_letters: DeadLetters
    settings: BusSettings
    health: Health | None = None
    metrics: Metrics | None = None


class QueueConsumer(abc.ABC, Generic[M]):
    """What both consumers share: start, readiness, dead-lettering, settling, draining."""

    def __init__(self, needs: Needs, channel: AbstractChannel, queue: AbstractQueue) -> None:
        self._needs = needs
        self._channel = channel
        self._queue = queue
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._failing = False
        self._retry_for = needs.settings.transient_retry_for
        self.processed = 0

    @property
    @abc.abstractmethod
    def active(self) -> bool:
        """Whether the queue's deliveries come to us now."""

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Messages taken from the broker and not settled yet."""

    @abc.abstractmethod
    def _cancel_in_flight(self) -> None:
        """Give up on what is still running at the drain deadline."""

    async def start(self) -> None:
        await self._attach()
        if self._needs.health is not None:
            # a worker whose consumer is gone (channel closed, not yet recovered) is not ready
            self._needs.health.add_probe(self._probe_name, "consumer", self._probe)

    @abc.abstractmethod
    async def _attach(self) -> None:
        """Start consuming the queue."""

    @abc.abstractmethod
    async def _detach(self, timeout: float) -> None:
        """Stop consuming the queue (deliveries already taken stay ours to settle)."""

    @property
    def _probe_name(self) -> str:
        return f"consumer {self._queue.name}"

    def _probe(self) -> str | None:
        return None if self.active else "no consumer attached"

    def _failing_since(self, exc: BaseException) -> None:
        """Log the first transient failure only: the outage, not every retry of it."""
        if not self._failing:
            self._failing = True
            log.warning("bus.transient", queue=self._queue.name, error=str(exc)[:300])

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("bus.recovered", queue=self._queue.name)

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` (with jitter) before a retry, or less when the consumer stops."""
        await pause(jittered(delay), self._stopping)

    async def _reject(self, message: M, reason: str) -> None:
        log.warning(
            "bus.dead_lettered",
            queue=self._queue.name,
            message_id=message.message_id,
            reason=reason,
        )
        if self._needs.metrics is not None:
            self._needs.metrics.dead_letter(self._queue.name, reason)
        try:
            await self._needs.dead_letters.dead_letter(message, reason)
        except TransientError as exc:
            log.warning("bus.dead_letter_failed", error=str(exc))
            await asyncio.sleep(TRANSIENT_RETRY_DELAY)
            await self._finish(message, ack=False)
            return
        await self._finish(message, ack=True)

    async def _finish(self, message: M, *, ack: bool) -> None:
        """Ack it, or nack it back to the queue."""
        await self._settle(message.ack() if ack else message.nack(requeue=True))

    async def _settle(self, op: Awaitable[None]) -> None:
        """Ack or nack; a channel already gone means the broker requeues it for us."""
        try:
            await op
        except (aiormq.exceptions.AMQPError, RuntimeError, ConnectionError) as exc:
            log.info("bus.settle_skipped", queue=self._queue.name, error=repr(exc))

    async def stop(self, timeout: float) -> None:
        """Stop taking deliveries, let in-flight ones finish within ``timeout``, close."""
        self._stopping.set()  # messages waiting out an outage go back to the queue now
        if self._needs.health is not None:
            self._needs.health.drop_probe(self._probe_name)
        await self._detach(timeout)
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("bus.drain_timeout", queue=self._queue.name, in_flight=self.in_flight)
            self._cancel_in_flight()
        if not self._channel.is_closed:
            await self._channel.close()


class Consumer(QueueConsumer[AbstractIncomingMessage]):
    """Runs a handler per delivery; acks after it returns, dead-letters what is poison.

    The handler must make its work safe downstream (a confirmed publish, a committed
    transaction) before returning; an ack never precedes that.
    """

    def __init__(
        self, needs: Needs, channel: AbstractChannel, queue: AbstractQueue, handler: Handler
    ) -> None:
        super().__init__(needs, channel, queue)
        self._handler = handler
        self._tag: str | None = None
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def active(self) -> bool:
        return self._tag is not None and not self._channel.is_closed

    async def _attach(self) -> None:
        self._tag = await self._queue.consume(self._on_message)

    async def _detach(self, timeout: float) -> None:
        if self._tag is not None and not self._channel.is_closed:
            try:
                await self._queue.cancel(self._tag, timeout=timeout)
            except (aiormq.exceptions.AMQPError, TimeoutError, RuntimeError) as exc:
                log.info("bus.cancel_failed", error=repr(exc))
        self._tag = None

    def _cancel_in_flight(self) -> None:
        for task in list(self._in_flight):
            task.cancel()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._in_flight.add(task)
        self._idle.clear()
        try:
            await self._process(message)
        finally:
            self._in_flight.discard(task)
            if not self._in_flight:
                self._idle.set()

    async def _process(self, message: AbstractIncomingMessage) -> None:
        loop = asyncio.get_running_loop()
        delay = TRANSIENT_RETRY_DELAY
        deadline: float | None = None
        while True:
            try:
                await self._handler(message)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, TransientError):
                    self._failing_since(exc)
                    now = loop.time()
                    deadline = deadline if deadline is not None else now + self._retry_for
                    if now >= deadline or self._stopping.is_set():
                        await self._finish(message, ack=False)
                        return
                    await self._pause(delay)
                    delay = min(delay * 2, TRANSIENT_RETRY_MAX)
                    continue
                if not isinstance(exc, POISON):
                    log.exception("bus.handler_bug", queue=self._queue.name)
                await self._reject(message, dead_letter_reason(exc, self._queue.name))
                return
            self._recovered()
            await self._finish(message, ack=True)
            self.processed += 1
            return


def dead_letter_reason(exc: BaseException, queue: str) -> str:
    """The ``x-omniroute-reason`` of a message that ended with ``exc``."""
    if isinstance(exc, POISON):
        return _reason(exc)
    if not isinstance(exc, Exception):
        return f"bug: {type(exc).__name__}"
    return f"bug: {type(exc).__name__}: {exc}"


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        if not errors:
            return "schema violation"
        first = errors[0]
        if first["type"] == "json_invalid":
            return f"invalid JSON: {first['msg']}"
        where = ".".join(str(p) for p in first["loc"]) or "?"
        return f"schema violation: {exc.error_count()} error(s), first at {where}: {first['msg']}"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} at {exc.pos}"
    if isinstance(exc, UnicodeDecodeError):
        return "invalid JSON: body is not UTF-8"
    return str(exc)
