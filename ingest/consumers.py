"""Consumers that ack a delivery only once its handler made it safe downstream.

``Consumer`` runs a handler per delivery. ``BatchConsumer`` hands the deliveries that
arrived together to one handler call, which answers each message's outcome: a stage that
reads a database and publishes per message (the router) then pays for one query, one
transaction and one ack frame per batch instead of per message.

Both: a ``TransientError`` (broker, directory) is retried here with capped backoff for
``bus.transient_retry_for`` seconds before the message goes back to the queue, since
requeueing at once would spend the delivery limit in seconds and dead-letter good messages
during a short outage; poison (an invalid body, a ``PoisonError``) and handler bugs are
dead-lettered with the reason; a message is acked only after its handler returned.
"""

import abc
import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from ingest.errors import PoisonError, TransientError

if TYPE_CHECKING:
    from ingest.bus import Bus

log = structlog.get_logger("omniroute.bus")

TRANSIENT_RETRY_DELAY = 1.0
TRANSIENT_RETRY_MAX = 30.0
POISON = (PoisonError, ValidationError, json.JSONDecodeError, UnicodeDecodeError)

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]
#: one outcome per message, in order: None (done, ack it) or the exception it ended with
BatchHandler = Callable[
    [list[AbstractIncomingMessage]], Awaitable[Sequence[BaseException | None]]
]


class _Settling(abc.ABC):
    """What both consumers share: start, readiness, dead-lettering, settling, draining."""

    def __init__(self, bus: "Bus", channel: AbstractChannel, queue: AbstractQueue) -> None:
        self._bus = bus
        self._channel = channel
        self._queue = queue
        self._tag: str | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._failing = False
        self._retry_for = bus.settings.transient_retry_for
        self.processed = 0

    @property
    def active(self) -> bool:
        return self._tag is not None and not self._channel.is_closed

    @property
    @abc.abstractmethod
    def in_flight(self) -> int:
        """Messages taken from the broker and not settled yet."""

    @abc.abstractmethod
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Take one delivery (aio-pika runs this in a task of its own)."""

    @abc.abstractmethod
    def _cancel_in_flight(self) -> None:
        """Give up on what is still running at the drain deadline."""

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)
        if self._bus.health is not None:
            # a worker whose consumer is gone (channel closed, not yet recovered) is not ready
            self._bus.health.probes[f"consumer {self._queue.name}"] = self._probe

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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay * (0.5 + random.random())):  # noqa: S311
                await self._stopping.wait()

    async def _reject(self, message: AbstractIncomingMessage, reason: str) -> None:
        log.warning(
            "bus.dead_lettered",
            queue=self._queue.name,
            message_id=message.message_id,
            reason=reason,
        )
        if self._bus.metrics is not None:
            self._bus.metrics.dead_lettered.labels(self._queue.name).inc()
        try:
            await self._bus.dead_letter(message, reason)
        except TransientError as exc:
            log.warning("bus.dead_letter_failed", error=str(exc))
            await asyncio.sleep(TRANSIENT_RETRY_DELAY)
            await self._finish(message, ack=False)
            return
        await self._finish(message, ack=True)

    async def _finish(self, message: AbstractIncomingMessage, *, ack: bool) -> None:
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
        if self._bus.health is not None:
            self._bus.health.probes.pop(f"consumer {self._queue.name}", None)
        if self._tag is not None and not self._channel.is_closed:
            try:
                await self._queue.cancel(self._tag, timeout=timeout)
            except (aiormq.exceptions.AMQPError, TimeoutError, RuntimeError) as exc:
                log.info("bus.cancel_failed", error=repr(exc))
        self._tag = None
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("bus.drain_timeout", queue=self._queue.name, in_flight=self.in_flight)
            self._cancel_in_flight()
        if not self._channel.is_closed:
            await self._channel.close()


class Consumer(_Settling):
    """Runs a handler per delivery; acks after it returns, dead-letters what is poison.

    The handler must make its work safe downstream (a confirmed publish, a committed
    transaction) before returning; an ack never precedes that.
    """

    def __init__(
        self, bus: "Bus", channel: AbstractChannel, queue: AbstractQueue, handler: Handler
    ) -> None:
        super().__init__(bus, channel, queue)
        self._handler = handler
        self._in_flight: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

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


class BatchConsumer(_Settling):
    """Hands the deliveries that arrived together to one handler call.

    Up to ``concurrency`` batches run at once, each of at most ``max_batch`` messages, so
    one batch is read and decided while the previous one waits for its confirms. Whatever
    arrives while the batches run forms the next one: a quiet queue gets batches of one and
    waits for nothing, a busy one gets large batches.

    The messages a batch finished are acked with one ``multiple`` ack when no earlier
    delivery of the channel is still unsettled (otherwise one ack each); a message never
    acks another that is still being processed.
    """

    def __init__(
        self,
        bus: "Bus",
        channel: AbstractChannel,
        queue: AbstractQueue,
        handler: BatchHandler,
        *,
        max_batch: int,
        concurrency: int = 2,
    ) -> None:
        super().__init__(bus, channel, queue)
        self._handler = handler
        self._max = max(1, max_batch)
        self._concurrency = max(1, concurrency)
        self._buffer: list[AbstractIncomingMessage] = []
        self._running: set[asyncio.Task[None]] = set()
        self._held = 0  # messages in the running batches
        self._settling = asyncio.Lock()
        # delivery tags handed to us and not yet settled, per underlying AMQP channel
        self._unsettled: dict[Any, set[int]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._buffer) + self._held

    def _cancel_in_flight(self) -> None:
        self._buffer.clear()
        for task in list(self._running):
            task.cancel()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self._unsettled.setdefault(message.channel, set()).add(message.delivery_tag or 0)
        self._buffer.append(message)
        self._idle.clear()
        self._kick()

    def _kick(self) -> None:
        while self._buffer and len(self._running) < self._concurrency:
            batch = self._buffer[: self._max]
            del self._buffer[: self._max]
            task = asyncio.create_task(self._run(batch), name=f"batch {self._queue.name}")
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._kick()
        if not self._running and not self._buffer:
            self._idle.set()

    async def _run(self, batch: list[AbstractIncomingMessage]) -> None:
        self._held += len(batch)
        try:
            await self._run_batch(batch)
        except Exception:  # a bug of ours: nothing may stay unsettled, the broker retries
            log.exception("bus.batch_failed", queue=self._queue.name)
            for message in batch:
                if self._is_unsettled(message):  # a settled tag nacked closes the channel
                    with contextlib.suppress(Exception):
                        await self._nack(message)
        finally:
            self._held -= len(batch)

    async def _run_batch(self, batch: list[AbstractIncomingMessage]) -> None:
        loop = asyncio.get_running_loop()
        delay = TRANSIENT_RETRY_DELAY
        deadline: float | None = None
        pending = batch
        while pending:
            outcomes = await self._call(pending)
            done: list[AbstractIncomingMessage] = []
            retry: list[AbstractIncomingMessage] = []
            transient: BaseException | None = None
            for message, outcome in zip(pending, outcomes, strict=True):
                if outcome is None:
                    done.append(message)
                elif isinstance(outcome, TransientError) or not isinstance(outcome, Exception):
                    # a CancelledError that reached a message (a confirm failed by a dying
                    # connection) is an outage too, never a reason to dead-letter it
                    retry.append(message)
                    transient = outcome
                else:
                    await self._reject_batched(message, outcome)
            await self._ack(done)
            self.processed += len(done)
            if transient is None:
                self._recovered()
                return
            self._failing_since(transient)
            now = loop.time()
            deadline = deadline if deadline is not None else now + self._retry_for
            if now >= deadline or self._stopping.is_set():
                for message in retry:
                    await self._nack(message)
                return
            await self._pause(delay)
            delay = min(delay * 2, TRANSIENT_RETRY_MAX)
            pending = retry

    async def _call(
        self, batch: list[AbstractIncomingMessage]
    ) -> Sequence[BaseException | None]:
        """The handler's outcomes; an exception it raises is every message's outcome."""
        try:
            outcomes = await self._handler(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, (TransientError, *POISON)):
                log.exception("bus.handler_bug", queue=self._queue.name)
            return [exc] * len(batch)
        if len(outcomes) != len(batch):
            bug = RuntimeError(f"handler answered {len(outcomes)} outcomes for {len(batch)}")
            return [bug] * len(batch)
        return outcomes

    async def _reject_batched(self, message: AbstractIncomingMessage, exc: BaseException) -> None:
        if not isinstance(exc, POISON):
            log.error("bus.handler_bug", queue=self._queue.name, exc_info=exc)
        await self._reject(message, dead_letter_reason(exc, self._queue.name))

    async def _nack(self, message: AbstractIncomingMessage) -> None:
        await self._finish(message, ack=False)

    def _is_unsettled(self, message: AbstractIncomingMessage) -> bool:
        try:
            return (message.delivery_tag or 0) in self._unsettled.get(message.channel, set())
        except (RuntimeError, aiormq.exceptions.AMQPError):
            return False  # its channel is gone: the broker has requeued it

    async def _finish(self, message: AbstractIncomingMessage, *, ack: bool) -> None:
        # its tag leaves the unsettled set only once the frame is sent: until then no
        # ``multiple`` ack of another batch may cover it
        async with self._settling:
            await super()._finish(message, ack=ack)
            with contextlib.suppress(RuntimeError, aiormq.exceptions.AMQPError):
                self._unsettled.get(message.channel, set()).discard(message.delivery_tag or 0)

    async def _ack(self, messages: list[AbstractIncomingMessage]) -> None:
        """One ``multiple`` ack per channel when it settles exactly these, else one each.

        Under a lock: a batch's acks are being written while another batch looks at what
        is unsettled, and a ``multiple`` ack must never cover a tag whose own ack is still
        to be sent (the broker closes the channel on an unknown tag).
        """
        async with self._settling:
            by_channel: dict[Any, list[AbstractIncomingMessage]] = {}
            for message in messages:
                try:
                    by_channel.setdefault(message.channel, []).append(message)
                except (RuntimeError, aiormq.exceptions.AMQPError):
                    continue  # its channel is gone: the broker has requeued it
            for channel, acked in by_channel.items():
                unsettled = self._unsettled.get(channel, set())
                tags = {m.delivery_tag or 0 for m in acked}
                last = max(acked, key=lambda m: m.delivery_tag or 0)
                top = last.delivery_tag or 0
                covers_only_these = all(tag in tags for tag in unsettled if tag <= top)
                if covers_only_these:
                    await self._settle(last.ack(multiple=True))
                else:
                    for message in acked:
                        await self._settle(message.ack())
                unsettled.difference_update(tags)
            # a closed channel's deliveries went back to the queue: nothing left to settle
            for channel in [c for c in self._unsettled if c.is_closed]:
                del self._unsettled[channel]


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
