"""A message taken from a queue, read straight off aiormq, and what any received message has.

The router's consumer reads deliveries from aiormq itself rather than through aio-pika's
``Queue.consume``: aio-pika runs every delivery in a second task and copies each of its
properties into an ``IncomingMessage``, which together cost the router about a twentieth of
its time per message. ``Delivery`` reads a property only when asked.
"""

from typing import Any, Protocol

import aiormq
from aiormq.abc import DeliveredMessage


class Received(Protocol):
    """What dead-lettering reads of a message: aio-pika's ``IncomingMessage`` and
    ``Delivery`` both have it."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Any: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def exchange(self) -> str | None: ...
    @property
    def routing_key(self) -> str | None: ...


class Settleable(Received, Protocol):
    """A received message a consumer acks or nacks."""

    async def ack(self, multiple: bool = False) -> None: ...
    async def nack(self, multiple: bool = False, requeue: bool = True) -> None: ...


class Delivery:
    """One delivery of a consumer with manual acks, settled on the channel it came on."""

    __slots__ = ("_raw", "body", "channel", "delivery_tag")

    def __init__(self, raw: DeliveredMessage) -> None:
        self._raw = raw
        self.body: bytes = raw.body
        self.channel: aiormq.abc.AbstractChannel = raw.channel
        self.delivery_tag: int = raw.delivery_tag or 0

    @property
    def headers(self) -> dict[str, Any]:
        return dict(self._raw.header.properties.headers or {})

    @property
    def message_id(self) -> str | None:
        return self._raw.header.properties.message_id

    @property
    def type(self) -> str | None:
        return self._raw.header.properties.message_type

    @property
    def content_type(self) -> str | None:
        return self._raw.header.properties.content_type

    @property
    def exchange(self) -> str | None:
        return self._raw.exchange

    @property
    def routing_key(self) -> str | None:
        return self._raw.routing_key

    @property
    def redelivered(self) -> bool:
        return bool(self._raw.redelivered)

    async def ack(self, multiple: bool = False) -> None:
        await self.channel.basic_ack(self.delivery_tag, multiple=multiple)

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        await self.channel.basic_nack(self.delivery_tag, multiple=multiple, requeue=requeue)
