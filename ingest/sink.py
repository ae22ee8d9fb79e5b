"""Publishing normalised input onto ``omniroute.inbound``: the way in for every connector."""

from collections.abc import Sequence

from ingest.bus import Bus
from ingest.schema import InboundMessage
from ingest.topology import INBOUND


class BusSink:
    """An ``InboundSink`` that returns once the broker confirmed the publish.

    The routing key is the channel (``email``, ``sms``, ``voice``, ``twitter``), so a
    consumer can bind to one channel's input only.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def submit(self, message: InboundMessage) -> None:
        await self._bus.publish(INBOUND, message.channel, message, message_id=message.id)

    async def submit_many(self, messages: Sequence[InboundMessage]) -> list[BaseException | None]:
        """The messages published at once, their confirms awaited together
        (``Bus.publish_many``)."""
        items = [(m.channel, m, m.id) for m in messages]
        return list(await self._bus.publish_many(INBOUND, items))
