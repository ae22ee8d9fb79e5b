"""The router's consumer: the deliveries that arrived together go to one handler call.

A stage that reads a database and publishes per message (the router) then pays for one
query, one transaction and one ack frame per batch instead of per message. Deliveries are
read straight off aiormq (``ingest.delivery``), so this consumer consumes again by itself
after a reconnection or a cancel by the broker. Retries, dead-lettering and draining are
``ingest.consumers``'.
"""

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from ingest.consumers import (
    POISON,
    TRANSIENT_RETRY_DELAY,
    TRANSIENT_RETRY_MAX,
    Needs,
    QueueConsumer,
    dead_letter_reason,
)
from ingest.delivery import Delivery
from ingest.errors import TransientError

log = structlog.get_logger("omniroute.bus")

#: one outcome per message, in order: None (done, ack it) or the exception it ended with
BatchHandler = Callable[[list[Delivery]], Awaitable[Sequence[BaseException | None]]]


class BatchConsumer(QueueConsumer[Delivery]):
    """Hands the deliveries that arrived together to one handler call.

    Up to ``concurrency`` batches run at once, each of at most ``max_batch`` messages, so
    one batch is read and decided while the previous one waits for its confirms. Whatever
    arrives while the batches run forms the next one: a quiet queue gets batches of one and
    waits for nothing, a busy one gets large batches. While a batch is being handled, the
    next starts only once half of ``max_batch`` has arrived (or when the batch ends):
    started at once, it would take the first few deliveries that the broker sends after
    an ack, and a batch's fixed cost (queries, a transaction) would be paid for a handful.
    A batch waiting out an outage does not hold the others back.

    The messages a batch finished are acked with one ``multiple`` ack when no earlier
    delivery of the channel is still unsettled (otherwise one ack each); a message never
    acks another that is still being processed.
    """

    def __init__(
        self,
        needs: Needs,
        channel: AbstractChannel,
        queue: AbstractQueue,
        handler: BatchHandler,
        *,
        max_batch: int,
        concurrency: int = 2,
    ) -> None:
        super().__init__(needs, channel, queue)
        self._handler = handler
        self._max = max(1, max_batch)
        self._concurrency = max(1, concurrency)
        self._buffer: list[Delivery] = []
        self._running: set[asyncio.Task[None]] = set()
        self._pausing = 0  # running batches waiting out an outage
        self._held = 0  # messages in the running batches
        self._settling = asyncio.Lock()
        # delivery tags handed to us and not yet settled, per underlying AMQP channel
        self._unsettled: dict[Any, set[int]] = {}
        # one tag for the consumer's whole life, on each AMQP channel the robust one opens
        self._tag = f"omniroute.{queue.name}.{uuid.uuid4().hex[:12]}"
        self._underlay: aiormq.Channel | None = None
        self._resuming: asyncio.Task[None] | None = None
        self._backing_off = False  # the resuming task waits out a backoff

    @property
    def in_flight(self) -> int:
        return len(self._buffer) + self._held

    @property
    def active(self) -> bool:
        underlay = self._underlay
        return (
            underlay is not None
            and not underlay.is_closed
            and self._tag in underlay.consumers
            and not self._stopping.is_set()
        )

    async def _attach(self) -> None:
        """Consume straight from aiormq (see ``ingest.delivery``). aio-pika restores only
        its own consumers after a reconnection, so this one consumes again itself: when the
        robust channel reopens, and when the broker cancels it (queue deleted, failover)."""
        if isinstance(self._channel, AbstractRobustChannel):
            self._channel.reopen_callbacks.add(self._on_reopen)
        try:
            await self._consume()
        except BaseException:
            # not started: nothing may consume again on this channel once it reopens
            if isinstance(self._channel, AbstractRobustChannel):
                self._channel.reopen_callbacks.discard(self._on_reopen)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self._needs.settings.publish_timeout):
                    await self._channel.close()
            raise

    async def _consume(self) -> None:
        underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        self._underlay = underlay
        if self._tag in underlay.consumers:
            return
        underlay.on_consumer_cancel_callbacks.add(self._on_cancelled)
        await underlay.basic_consume(
            self._queue.name,
            self._on_delivered,
            consumer_tag=self._tag,
            timeout=self._needs.settings.publish_timeout,
        )

    def _on_reopen(self, *_: Any) -> None:
        # a new channel: consume now, not when a retry waiting out its backoff wakes up
        if self._resuming is not None and not self._resuming.done() and self._backing_off:
            self._resuming.cancel()
        self._resume()

    def _on_cancelled(self, frame: aiormq.spec.Basic.Cancel) -> None:
        if frame.consumer_tag == self._tag and not self._stopping.is_set():
            log.warning("bus.consumer_cancelled", queue=self._queue.name)
            self._resume()

    def _resume(self) -> None:
        if self._stopping.is_set() or (self._resuming is not None and not self._resuming.done()):
            return
        self._resuming = asyncio.create_task(self._resume_consuming(), name="resume consumer")

    async def _resume_consuming(self) -> None:
        delay = TRANSIENT_RETRY_DELAY
        failed = False
        while not self._stopping.is_set():
            try:
                # bounded: a reconnection still under way is waited out by the next try
                async with asyncio.timeout(2 * self._needs.settings.publish_timeout):
                    await self._probe_queue()
                    await self._consume()
            except (aiormq.exceptions.AMQPError, TimeoutError, RuntimeError, OSError) as exc:
                if not failed:  # the first failure, not every retry of it
                    log.info("bus.consume_retry", queue=self._queue.name, error=repr(exc)[:300])
                failed = True
            else:
                log.info("bus.consumer_resumed", queue=self._queue.name)
                return
            self._backing_off = True
            try:
                await self._pause(delay)
            finally:
                self._backing_off = False
            delay = min(delay * 2, TRANSIENT_RETRY_MAX)

    async def _probe_queue(self) -> None:
        """Fail unless the queue exists, asked on a throwaway channel: a consume of a
        missing queue would make the broker close ours, which aio-pika does not reopen."""
        underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        timeout = self._needs.settings.publish_timeout
        probe = await underlay.connection.channel(publisher_confirms=False, timeout=timeout)
        try:
            await probe.queue_declare(self._queue.name, passive=True, timeout=timeout)
        finally:
            if not probe.is_closed:
                await probe.close()

    async def _detach(self, timeout: float) -> None:
        if isinstance(self._channel, AbstractRobustChannel):
            self._channel.reopen_callbacks.discard(self._on_reopen)
        if self._resuming is not None and not self._resuming.done():
            self._resuming.cancel()
            await asyncio.wait([self._resuming])  # unlike awaiting it, keeps our own cancel
        underlay = self._underlay
        if underlay is None or underlay.is_closed or self._tag not in underlay.consumers:
            return
        try:
            await underlay.basic_cancel(self._tag, timeout=timeout)
        except (aiormq.exceptions.AMQPError, TimeoutError, RuntimeError, ConnectionError) as exc:
            log.info("bus.cancel_failed", error=repr(exc))

    def _cancel_in_flight(self) -> None:
        self._buffer.clear()
        for task in list(self._running):
            task.cancel()

    async def _on_delivered(self, raw: DeliveredMessage) -> None:
        delivery = Delivery(raw)
        self._unsettled.setdefault(delivery.channel, set()).add(delivery.delivery_tag)
        self._buffer.append(delivery)
        self._idle.clear()
        self._kick()

    def _kick(self) -> None:
        while self._buffer and len(self._running) < self._concurrency:
            busy = len(self._running) - self._pausing
            if busy and len(self._buffer) < max(1, self._max // 2):
                return  # a batch is being handled: let the next one fill up meanwhile
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

    async def _run(self, batch: list[Delivery]) -> None:
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

    async def _run_batch(self, batch: list[Delivery]) -> None:
        loop = asyncio.get_running_loop()
        delay = TRANSIENT_RETRY_DELAY
        deadline: float | None = None
        pending = batch
        while pending:
            outcomes = await self._call(pending)
            done: list[Delivery] = []
            retry: list[Delivery] = []
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
            self._pausing += 1
            self._kick()
            try:
                await self._pause(delay)
            finally:
                self._pausing -= 1
            delay = min(delay * 2, TRANSIENT_RETRY_MAX)
            pending = retry

    async def _call(self, batch: list[Delivery]) -> Sequence[BaseException | None]:
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

    async def _reject_batched(self, message: Delivery, exc: BaseException) -> None:
        if not isinstance(exc, POISON):
            log.error("bus.handler_bug", queue=self._queue.name, exc_info=exc)
        await self._reject(message, dead_letter_reason(exc, self._queue.name))

    async def _nack(self, message: Delivery) -> None:
        await self._finish(message, ack=False)

    def _is_unsettled(self, message: Delivery) -> bool:
        return message.delivery_tag in self._unsettled.get(message.channel, set())

    async def _finish(self, message: Delivery, *, ack: bool) -> None:
        # its tag leaves the unsettled set only once the frame is sent: until then no
        # ``multiple`` ack of another batch may cover it
        async with self._settling:
            await super()._finish(message, ack=ack)
            self._unsettled.get(message.channel, set()).discard(message.delivery_tag)

    async def _ack(self, messages: list[Delivery]) -> None:
        """One ``multiple`` ack per channel when it settles exactly these, else one each.

        Under a lock: a batch's acks are being written while another batch looks at what
        is unsettled, and a ``multiple`` ack must never cover a tag whose own ack is still
        to be sent (the broker closes the channel on an unknown tag).
        """
        async with self._settling:
            by_channel: dict[Any, list[Delivery]] = {}
            for message in messages:
                by_channel.setdefault(message.channel, []).append(message)
            for channel, acked in by_channel.items():
                unsettled = self._unsettled.get(channel, set())
                tags = {m.delivery_tag for m in acked}
                last = max(acked, key=lambda m: m.delivery_tag)
                top = last.delivery_tag
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
