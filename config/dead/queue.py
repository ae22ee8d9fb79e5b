"""Looking at ``omniroute.dead`` without taking anything off it but what is replayed or
purged.

A command takes the queue's ready messages with ``basic.get`` and manual acknowledgement, on a
channel of its own, and holds them unacknowledged while it looks; it acknowledges only the
messages it replayed (after the broker confirmed the new copy) or purged. Closing the channel
hands every other message back: a quorum queue returns them ahead of anything that arrived
meanwhile, in their old order (tests/test_dead_cli.py proves it on the real broker). Each
return adds one to the message's ``x-delivery-count``; ``omniroute.dead`` is declared
without ``x-delivery-limit`` (``ingest.topology.queue_arguments``), so the count only grows
and nothing is dropped for it.

Only the messages ready when the command starts are read (the queue's depth then): one that
dies again after its replay, or arrives meanwhile, waits for the next command, so a replay
happens once. A crash between a replay's confirm and the acknowledgement leaves the dead copy
in the queue (a duplicate, which consumers drop by ``message_id``), never a loss.
"""

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

import aiormq
from aiormq.abc import DeliveredMessage

from config.dead import letters
from config.dead.letters import DeadLetter
from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.topology import DEAD, DEAD_QUEUE, EXCHANGES

#: replays whose confirms are awaited together
AT_ONCE = 100


@dataclass(frozen=True)
class Held:
    """A dead letter read and not acknowledged yet: the broker's tag for it."""

    letter: DeadLetter
    tag: int


class DeadQueue:
    """``async with DeadQueue(bus) as dead``: the queue's messages held while the block
    runs, handed back when it ends (all but those ``replay`` or ``remove`` took)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._channel: aiormq.abc.AbstractChannel | None = None
        self.consumers = 0

    async def __aenter__(self) -> Self:
        channel = await self._bus.connection.channel()
        self._channel = await channel.get_underlay_channel()
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            # unacknowledged messages go back to the queue, in their order (the channel's
            # acks before this close are all applied first: AMQP keeps a channel's order)
            await channel.close()

    def _require(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            raise TransientError("broker: the channel to omniroute.dead was closed")
        return self._channel

    async def read(self, keep_body: Callable[[DeadLetter], bool] | None = None) -> list[Held]:
        """Every message ready in the queue now, in the queue's order, held; bodies only of
        those ``keep_body`` wants."""
        ready, self.consumers = await self._bus.queue_depth(DEAD_QUEUE)
        channel = self._require()
        timeout = self._bus.settings.publish_timeout
        held: list[Held] = []
        try:
            for _ in range(ready):
                got: DeliveredMessage = await channel.basic_get(
                    DEAD_QUEUE, no_ack=False, timeout=timeout
                )
                if isinstance(got.delivery, aiormq.spec.Basic.GetEmpty):
                    break  # another consumer took the rest
                props = got.header.properties
                letter = letters.read(
                    got.body,
                    props.headers,
                    message_id=props.message_id,
                    type_=props.message_type,
                    content_type=props.content_type,
                    timestamp=props.timestamp,
                    keep_body=False,
                )
                if keep_body is not None and keep_body(letter):
                    letter = letters.read(
                        got.body,
                        props.headers,
                        message_id=props.message_id,
                        type_=props.message_type,
                        content_type=props.content_type,
                        timestamp=props.timestamp,
                        keep_body=True,
                    )
                held.append(Held(letter, got.delivery_tag or 0))
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransientError(f"broker: reading {DEAD_QUEUE} failed: {exc!r}") from exc
        return held

    async def remove(self, held: Held) -> None:
        """Take a held message off the queue for good."""
        try:
            await self._require().basic_ack(held.tag)
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransientError(f"broker: removing {held.letter.id} failed: {exc!r}") from exc

    async def replay(self, chosen: Sequence[Held], now: datetime) -> list[Exception | None]:
        """Publish each to the exchange and routing key it came from, with the replay
        recorded in its headers, and remove the dead copy once the broker confirmed the new
        one; one outcome per message (None: replayed)."""
        outcomes: list[Exception | None] = []
        for start in range(0, len(chosen), AT_ONCE):
            batch = chosen[start : start + AT_ONCE]
            results = await asyncio.gather(
                *(self._publish(held.letter, now) for held in batch), return_exceptions=True
            )
            for held, result in zip(batch, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    outcomes.append(
                        result if isinstance(result, Exception) else TransientError(str(result))
                    )
                    continue
                await self.remove(held)
                outcomes.append(None)
        return outcomes

    async def _publish(self, letter: DeadLetter, now: datetime) -> None:
        if letter.body is None:
            raise RuntimeError(f"{letter.id}: read without its body")
        if (problem := letter.replay_problem()) is not None:
            raise TransientError(problem)
        if letter.exchange == DEAD or letter.exchange not in EXCHANGES:
            raise TransientError(f"{letter.exchange} is not an exchange omniroute replays to")
        await self._bus.publish_body(
            letter.exchange,
            letter.routing_key or "",
            letter.body,
            message_id=letter.message_id,
            type_=letter.type,
            headers=letter.replay_headers(now),
            content_type=letter.content_type or "application/octet-stream",
        )
