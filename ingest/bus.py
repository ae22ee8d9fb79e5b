"""The RabbitMQ bus: topology, a confirming publisher, and a consumer that acks only when safe.

aio-pika traps this module exists to close (each a lost or stuck message otherwise):
a ``basic.return`` resolves a publish as success unless the channel has
``on_return_raises=True``; messages are transient unless persistent; a publish on a robust
connection that is down waits forever without ``timeout=``; robust recovery restores only
the queues and exchanges we still hold references to; RabbitMQ 3.10 has no default delivery
limit for quorum queues, so ``x-delivery-limit`` is set here.
"""

import asyncio
from collections.abc import Sequence
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import BaseModel

from ingest.amqp import (
    broker_user,
    cancelled_here,
    connect,
    message_properties,
    publish_failure,
)
from ingest.batch_consumer import BatchConsumer, BatchHandler
from ingest.consumers import Consumer, Handler
from ingest.delivery import Received
from ingest.errors import ConfigError, TransientError
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
        #: the broker user omniroute publishes as, stamped on every message as the AMQP
        #: ``user_id`` (RabbitMQ checks it), so that readers can tell omniroute's own
        #: messages from anyone else's (``events.trusted_publishers``); None: unknown
        self.user = broker_user(url)
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
        channel = self._require_channel()
        if exchange not in self._exchanges:  # the broker would close the channel on it
            raise TransientError(f"exchange {exchange} is not declared yet")
        # aiormq's own properties and publish: aio-pika's Message and Exchange wrappers cost
        # as much CPU per message as the router's whole decision; the semantics are aiormq's
        # (mandatory, confirms, returns raised: the channel has on_return_raises)
        properties = message_properties(message_id, type_, headers, content_type, self.user)
        try:
            # the whole publish, a wait for a robust reconnection included, is bounded
            async with asyncio.timeout(self._settings.publish_timeout):
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
                await underlay.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    # still returns only once the broker confirmed the message; it just
                    # does not also wait for the frame to reach the socket first (5 % of
                    # the router's instructions)
                    wait=False,
                )
        except asyncio.CancelledError as exc:
            if cancelled_here():
                raise
            raise publish_failure(exc, exchange, routing_key) from exc
        except Exception as exc:
            failure = publish_failure(exc, exchange, routing_key)
            if failure is exc:
                raise
            raise failure from exc

    async def publish_many(
        self, exchange: str, models: Sequence[tuple[str, BaseModel, str]]
    ) -> list[Exception | None]:
        """Publish ``(routing_key, model, message_id)`` items as ``publish`` does, their
        confirms awaited together within one ``publish_timeout``; one outcome per item (None:
        confirmed). A confirm that came in time counts even if others did not."""
        outcomes: list[Exception | None] = [None] * len(models)
        ready: list[tuple[int, str, bytes, aiormq.spec.Basic.Properties]] = []
        for index, (key, model, message_id) in enumerate(models):
            try:
                body = model.model_dump_json().encode()
            except Exception as exc:  # a bug of ours, for this item alone
                outcomes[index] = exc
                continue
            properties = message_properties(message_id, schema_name(model), None, user_id=self.user)
            ready.append((index, key, body, properties))
        if not ready:
            return outcomes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.publish_timeout
        channel = self._require_channel()
        try:
            if exchange not in self._exchanges:
                raise TransientError(f"exchange {exchange} is not declared yet")
            async with asyncio.timeout_at(deadline):  # a robust reconnection in progress
                underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        except (asyncio.CancelledError, Exception) as exc:
            if isinstance(exc, asyncio.CancelledError) and cancelled_here():
                raise
            for index, *_ in ready:
                outcomes[index] = publish_failure(exc, exchange, "")
            return outcomes
        tasks = {
            index: asyncio.ensure_future(
                underlay.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=key,
                    properties=properties,
                    mandatory=True,
                    wait=False,  # as in publish_body
                )
            )
            for index, key, body, properties in ready
        }
        try:
            _, late = await asyncio.wait(tasks.values(), timeout=deadline - loop.time())
        finally:  # late ones, or all when this task is cancelled: not confirmed, not retried
            unfinished = [task for task in tasks.values() if not task.done()]
            for task in unfinished:
                task.cancel()
            if unfinished:
                await asyncio.wait(unfinished)
        for index, task in tasks.items():
            key = models[index][0]
            if task in late:
                outcomes[index] = TransientError(
                    f"publish to {exchange} failed: no confirm within "
                    f"{self._settings.publish_timeout} s"
                )
            elif task.cancelled():  # aiormq cancels the confirms of a connection it drops
                outcomes[index] = TransientError(f"publish to {exchange} failed: connection lost")
            elif (error := task.exception()) is not None:
                outcomes[index] = publish_failure(error, exchange, key)
        return outcomes

    async def dead_letter(self, message: Received, reason: str) -> None:
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
        await self._consume(consumer, stop, component, health, drain_timeout)

    async def consume_batches_until(
        self,
        queue_name: str,
        handler: BatchHandler,
        stop: asyncio.Event,
        *,
        prefetch: int,
        component: str,
        health: Health,
        drain_timeout: float,
    ) -> None:
        """``consume_until`` for a handler of many messages at once (``BatchConsumer``):
        two batches of up to half the prefetch window each run at a time."""
        channel, queue = await self._consumer_channel(queue_name, prefetch)
        consumer = BatchConsumer(
            self, channel, queue, handler, max_batch=max(1, prefetch // 2), concurrency=2
        )
        await self._consume(consumer, stop, component, health, drain_timeout)

    async def _consume(
        self,
        consumer: Consumer | BatchConsumer,
        stop: asyncio.Event,
        component: str,
        health: Health,
        drain_timeout: float,
    ) -> None:
        await consumer.start()
        health.set(component, "up")
        try:
            await stop.wait()
        finally:
            health.set(component, "stopped", "draining")
            await asyncio.shield(consumer.stop(drain_timeout))

    async def consumer(self, queue_name: str, handler: Handler, *, prefetch: int) -> Consumer:
        channel, queue = await self._consumer_channel(queue_name, prefetch)
        return Consumer(self, channel, queue, handler)

    async def _consumer_channel(
        self, queue_name: str, prefetch: int
    ) -> tuple[AbstractChannel, AbstractQueue]:
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        return channel, await channel.get_queue(queue_name, ensure=True)
