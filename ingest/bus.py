"""The RabbitMQ bus: topology, a confirming publisher, and a consumer that acks only when safe.

aio-pika traps this module exists to close (each a lost or stuck message otherwise):
a ``basic.return`` resolves a publish as success unless the channel has
``on_return_raises=True``; messages are transient unless persistent; a publish on a robust
connection that is down waits forever without ``timeout=``; robust recovery restores only
the queues and exchanges we still hold references to; RabbitMQ 3.10 has no default delivery
limit for quorum queues, so ``x-delivery-limit`` is set here.
"""

import asyncio
import contextlib
import json
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import BaseModel, ValidationError

from ingest.errors import AuthError, ConfigError, PoisonError, TransientError, UnroutableError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import schema_name
from ingest.settings import BusSettings

log = structlog.get_logger("omniroute.bus")

INBOUND = "omniroute.inbound"
ROUTED = "omniroute.routed"
OUTBOUND = "omniroute.outbound"
EVENTS = "omniroute.events"
DEAD = "omniroute.dead"
EXCHANGES = (INBOUND, ROUTED, OUTBOUND, EVENTS, DEAD)

ROUTER_QUEUE = "omniroute.router"
ROUTED_QUEUE = "omniroute.routed"
OUTBOUND_QUEUE = "omniroute.outbound"
EVENTS_QUEUE = "omniroute.events"
DEAD_QUEUE = "omniroute.dead"
#: queue -> the exchange it is bound to with ``#`` (it takes everything published there)
QUEUES = {
    ROUTER_QUEUE: INBOUND,
    ROUTED_QUEUE: ROUTED,
    OUTBOUND_QUEUE: OUTBOUND,
    EVENTS_QUEUE: EVENTS,
    DEAD_QUEUE: DEAD,
}

REASON_HEADER = "x-omniroute-reason"
TRANSIENT_RETRY_DELAY = 1.0
TRANSIENT_RETRY_MAX = 30.0

Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]


def amqp_heartbeat(window: int) -> int:
    """The AMQP heartbeat to ask for so that a stalled connection is noticed within
    ``window`` seconds (``bus.heartbeat`` is two heartbeats of the operator's clock).

    aiormq declares a connection dead after ``(heartbeat + 1) * 3`` silent seconds, checked
    every ``heartbeat / 2``; so ask for the largest heartbeat h with
    ``3 * (h + 1) + h / 2 <= 2 * window``. 0 disables heartbeats.
    """
    if window <= 0:
        return 0
    return max(1, int((2 * window - 3) / 3.5))


def with_heartbeat(url: str, heartbeat: int) -> str:
    """Add ``heartbeat=`` to an AMQP URL unless the operator set one: a stalled connection
    must be noticed within two ``bus.heartbeat`` periods, not after the kernel's TCP
    timeout."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(amqp_heartbeat(heartbeat)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


async def connect(url: str, settings: BusSettings, name: str) -> AbstractRobustConnection:
    """Open a robust connection; refused credentials are an ``AuthError``, not a retry loop."""
    try:
        async with asyncio.timeout(settings.connect_timeout):
            return await aio_pika.connect_robust(
                with_heartbeat(url, settings.heartbeat),
                timeout=settings.connect_timeout,
                client_properties={"connection_name": name},
            )
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise AuthError(f"broker refused the credentials in amqp_url ({redact_url(url)})") from exc
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
        raise TransientError(f"broker at {redact_url(url)} unreachable: {exc!r}") from exc


def queue_arguments(name: str, settings: BusSettings) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if settings.queue_type == "quorum":
        args["x-queue-type"] = "quorum"
    if name != DEAD_QUEUE:
        args["x-dead-letter-exchange"] = DEAD
        if settings.queue_type == "quorum":
            args["x-delivery-limit"] = settings.delivery_limit
    return args


class Bus:
    """One process's link to the broker: topology, publishing with confirms, consumers.

    Keeps a reference to every exchange and queue it declared so that robust recovery
    restores them after a reconnect.
    """

    def __init__(
        self,
        url: str,
        settings: BusSettings,
        *,
        name: str = "omniroute",
        health: Health | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._url = url
        self.health = health
        self.metrics = metrics
        self._settings = settings
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._queues: dict[str, AbstractQueue] = {}
        self._closing = False

    @property
    def settings(self) -> BusSettings:
        return self._settings

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._connection.is_closed

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransientError("bus is not open")
        return self._connection

    async def open(self) -> None:
        """Connect and declare the whole topology; idempotent against an existing broker."""
        self._connection = await connect(self._url, self._settings, self._name)
        if self.health is not None:
            self.health.probes["broker"] = self._probe
            self._connection.close_callbacks.add(self._on_lost)
            self._connection.reconnect_callbacks.add(self._on_back)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self.declare_topology()

    async def declare_topology(self) -> None:
        channel = self._require_channel()
        try:
            for name in EXCHANGES:
                self._exchanges[name] = await channel.declare_exchange(
                    name, aio_pika.ExchangeType.TOPIC, durable=True
                )
            for queue_name, exchange in QUEUES.items():
                queue = await channel.declare_queue(
                    queue_name, durable=True, arguments=queue_arguments(queue_name, self._settings)
                )
                await queue.bind(self._exchanges[exchange], "#")
                self._queues[queue_name] = queue
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise ConfigError(
                f"broker topology conflicts with omniroute's ({exc}); an existing queue was "
                "declared with other arguments (bus.queue_type?): delete it or match it"
            ) from exc

    def _probe(self) -> str | None:
        return None if self.connected else "connection lost, reconnecting"

    def _on_lost(self, *_: Any) -> None:
        if not self._closing:
            log.warning("bus.connection_lost")

    def _on_back(self, *_: Any) -> None:
        log.info("bus.reconnected")

    async def close(self) -> None:
        self._closing = True
        if self._connection is not None:
            await self._connection.close()
        self._connection = None
        self._channel = None

    def _require_channel(self) -> AbstractChannel:
        if self._channel is None:
            raise TransientError("bus is not open")
        return self._channel

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        model: BaseModel,
        *,
        message_id: str,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish a model as persistent JSON; returns only once the broker confirmed it."""
        await self.publish_body(
            exchange,
            routing_key,
            model.model_dump_json().encode(),
            message_id=message_id,
            type_=schema_name(model),
            headers=headers,
        )

    async def publish_body(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None,
        type_: str | None,
        headers: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self._require_channel()
        message = aio_pika.Message(
            body,
            content_type=content_type,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message_id,
            type=type_,
            timestamp=datetime.now(UTC),
            headers=headers or {},
        )
        try:
            await self._exchanges[exchange].publish(
                message, routing_key, mandatory=True, timeout=self._settings.publish_timeout
            )
        except aiormq.exceptions.PublishError as exc:
            raise UnroutableError(
                f"no queue bound for {exchange} with key {routing_key!r}"
            ) from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise TransientError(f"broker refused the publish on {exchange}: {exc!r}") from exc
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise TransientError(f"publish to {exchange} failed: {exc!r}") from exc

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        """Send the original body, with its properties and the reason, to ``omniroute.dead``."""
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = reason[:1000]
        headers["x-omniroute-source"] = f"{message.exchange}/{message.routing_key}"
        await self.publish_body(
            DEAD,
            message.routing_key or "unknown",
            message.body,
            message_id=message.message_id,
            type_=message.type,
            headers=headers,
            content_type=message.content_type or "application/octet-stream",
        )

    async def queue_depth(self, queue_name: str) -> tuple[int, int]:
        """``(messages ready, consumers)`` of a queue, asked of the broker now.

        Goes to the underlying channel: aio-pika's robust channel answers a repeated
        ``declare_queue`` from its cache, with the counts of the first declaration.
        """
        channel = await self._require_channel().get_underlay_channel()
        try:
            result = await channel.queue_declare(
                queue_name, passive=True, timeout=self._settings.publish_timeout
            )
        except (TimeoutError, aiormq.exceptions.AMQPError) as exc:
            raise TransientError(f"queue {queue_name}: {exc!r}") from exc
        return result.message_count or 0, result.consumer_count or 0

    async def consume_until(
        self,
        queue_name: str,
        handler: Handler,
        stop: asyncio.Event,
        *,
        prefetch: int,
        component: str,
        health: Health,
        drain_timeout: float,
    ) -> None:
        """A worker's whole life: consume until ``stop``, report the component up while it
        does, then let in-flight messages finish within ``drain_timeout``."""
        consumer = await self.consumer(queue_name, handler, prefetch=prefetch)
        await consumer.start()
        health.set(component, "up")
        try:
            await stop.wait()
        finally:
            health.set(component, "stopped", "draining")
            await asyncio.shield(consumer.stop(drain_timeout))

    async def consumer(self, queue_name: str, handler: Handler, *, prefetch: int) -> "Consumer":
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name, ensure=True)
        return Consumer(self, channel, queue, handler)


class Consumer:
    """Runs a handler per delivery; acks after it returns, dead-letters what is poison.

    The handler must make its work safe downstream (a confirmed publish, a committed
    transaction) before returning; an ack never precedes that. A ``TransientError`` is
    requeued after a pause; RabbitMQ's delivery limit ends a message that keeps failing in
    ``omniroute.dead``, so nothing loops forever.
    """

    def __init__(
        self, bus: Bus, channel: AbstractChannel, queue: AbstractQueue, handler: Handler
    ) -> None:
        self._bus = bus
        self._channel = channel
        self._queue = queue
        self._handler = handler
        self._tag: str | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
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
    def in_flight(self) -> int:
        return len(self._in_flight)

    async def start(self) -> None:
        self._tag = await self._queue.consume(self._on_message)
        if self._bus.health is not None:
            # a worker whose consumer is gone (channel closed, not yet recovered) is not ready
            self._bus.health.probes[f"consumer {self._queue.name}"] = self._probe

    def _probe(self) -> str | None:
        return None if self.active else "no consumer attached"

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
        """Run the handler; a transient failure (broker, directory) is retried here with
        capped backoff for ``bus.transient_retry_for`` seconds before the message goes back
        to the queue: requeueing at once would spend the delivery limit in seconds and
        dead-letter good messages during a short outage."""
        loop = asyncio.get_running_loop()
        delay = TRANSIENT_RETRY_DELAY
        deadline: float | None = None
        while True:
            try:
                await self._handler(message)
            except (PoisonError, ValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
                await self._reject(message, _reason(exc))
                return
            except TransientError as exc:
                self._failing_since(exc)
                now = loop.time()
                deadline = deadline if deadline is not None else now + self._retry_for
                if now >= deadline or self._stopping.is_set():
                    await self._settle(message.nack(requeue=True))
                    return
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay * (0.5 + random.random())):  # noqa: S311
                        await self._stopping.wait()
                delay = min(delay * 2, TRANSIENT_RETRY_MAX)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not block the queue: dead-letter with the reason
                log.exception("bus.handler_bug", queue=self._queue.name)
                await self._reject(message, f"bug: {type(exc).__name__}: {exc}")
                return
            self._recovered()
            await self._settle(message.ack())
            self.processed += 1
            return

    def _failing_since(self, exc: TransientError) -> None:
        """Log the first transient failure only: the outage, not every retry of it."""
        if not self._failing:
            self._failing = True
            log.warning("bus.transient", queue=self._queue.name, error=str(exc)[:300])

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("bus.recovered", queue=self._queue.name)

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
            await self._settle(message.nack(requeue=True))
            return
        await self._settle(message.ack())

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
            for task in list(self._in_flight):
                task.cancel()
        if not self._channel.is_closed:
            await self._channel.close()


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
