"""One process's connection to RabbitMQ and its confirming publisher.

aio-pika traps this module exists to close (each a lost or stuck message otherwise):
a ``basic.return`` resolves a publish as success unless the channel has
``on_return_raises=True``; messages are transient unless persistent; a publish on a robust
connection that is down waits forever without ``timeout=``; robust recovery restores only
the queues and exchanges we still hold references to. The names and the declaration are
``ingest.topology``'s; consuming is ``ingest.consume``'s. With several nodes in ``amqp_url``
(issue 18) a lost connection comes back on another node (``ingest.amqp.ClusterConnection``).
"""

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, cast

import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractQueue,
    AbstractRobustConnection,
)
from pydantic import BaseModel

from ingest import topology
from ingest.amqp import (
    ClusterConnection,
    broker_user,
    cancelled_here,
    connect,
    message_properties,
    publish_failure,
)
from ingest.delivery import Received
from ingest.errors import TransientError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import schema_name
from ingest.settings import BusSettings

log = structlog.get_logger("omniroute.bus")


class Bus:
    """One process's link to the broker: topology, publishing with confirms, consumers.

    Declares the topology when it opens, on a channel of its own closed afterwards, so that a
    reconnection does not declare it again (see ``declare_topology``).
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
        self._connection: ClusterConnection | None = None
        self._lost = False  # an outage is logged once, and its end once
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
    def node(self) -> str | None:
        """``host:port`` of the broker node the connection is on (or dials next)."""
        return None if self._connection is None else self._connection.node

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise TransientError("bus is not open")
        return self._connection

    async def open(self) -> None:
        """Connect and declare the whole topology; idempotent against an existing broker."""
        self._connection = await connect(self._url, self._settings, self._name)
        if self.health is not None:
            self.health.add_probe("broker", "connection", self._probe)
            self._connection.close_callbacks.add(self._on_lost)
            self._connection.reconnect_callbacks.add(self._on_back)
            log.info("bus.connected", node=self._connection.node)
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self.declare_topology()

    async def declare_topology(self) -> None:
        """Declare every exchange and queue (durable: they outlive a broker restart) on a
        channel of its own, closed afterwards, which aio-pika therefore never restores.

        Issue 18: a robust channel re-declares what it declared on every reconnection, and
        re-binding a queue waits on every node of a cluster: with one node hung (paused,
        partitioned), a reconnection to a healthy node waited for it, and routing with it.
        A daemon that starts declares the topology again (``open``)."""
        channel = await self.connection.channel(publisher_confirms=False)
        try:
            exchanges, queues = await topology.declare(channel, self._settings)
        finally:
            with contextlib.suppress(Exception):  # a conflict closed it already
                await channel.close()
        self._exchanges.update(exchanges)
        self._queues.update(queues)

    def _probe(self) -> str | None:
        return None if self.connected else "connection lost, reconnecting"

    def _on_lost(self, _connection: Any = None, error: BaseException | None = None) -> None:
        """The one line an outage gets (aiormq's and aio-pika's own are filtered out by
        ``ingest.amqp``), with the reason; failed attempts to reconnect add none."""
        if not self._closing and not self._lost:
            self._lost = True
            reason = f"{type(error).__name__}: {error}"[:300] if error is not None else None
            log.warning("bus.connection_lost", error=reason)

    def _on_back(self, *_: Any) -> None:
        self._lost = False
        log.info("bus.reconnected", node=self.node)

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
        self,
        exchange: str,
        models: Sequence[tuple[str, BaseModel, str]],
        *,
        headers: dict[str, Any] | None = None,
    ) -> list[Exception | None]:
        """Publish ``(routing_key, model, message_id)`` items as ``publish`` does, their
        confirms awaited together within one ``publish_timeout``; one outcome per item (None:
        confirmed). A confirm that came in time counts even if others did not. ``headers``
        go on every item."""
        outcomes: list[Exception | None] = [None] * len(models)
        ready: list[tuple[int, str, bytes, aiormq.spec.Basic.Properties]] = []
        for index, (key, model, message_id) in enumerate(models):
            try:
                body = model.model_dump_json().encode()
            except Exception as exc:  # a bug of ours, for this item alone
                outcomes[index] = exc
                continue
            properties = message_properties(
                message_id, schema_name(model), headers, user_id=self.user
            )
            ready.append((index, key, body, properties))
        if not ready:
            return outcomes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.publish_timeout
        try:
            channel = self._require_channel()  # not open yet (or closed): each item fails
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
        if self.metrics is not None and exchange == topology.ROUTED:  # issue 17: by team
            self.metrics.count_routed(
                m for (_, m, _), o in zip(models, outcomes, strict=True) if o is None
            )
        return outcomes

    async def dead_letter(self, message: Received, reason: str) -> None:
        """Send the original body, with its properties and the reason, to ``omniroute.dead``."""
        headers = dict(message.headers or {})
        headers[topology.REASON_HEADER] = reason[:1000]
        headers[topology.SOURCE_HEADER] = f"{message.exchange}/{message.routing_key}"
        await self.publish_body(
            topology.DEAD,
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

    async def channel(self, prefetch: int) -> AbstractChannel:
        """A channel of its own for a consumer, with its prefetch window."""
        channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=prefetch)
        return channel
