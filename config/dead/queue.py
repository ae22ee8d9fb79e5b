"""Looking at ``omniroute.dead`` without taking anything off it but what is replayed or
purged.

A command consumes the queue with manual acknowledgement on a channel of its own and holds
every message unacknowledged (what arrives while it reads is read too, until the queue is
empty). It acknowledges only what it replays (after the broker confirmed the new copy) or
purges. Everything else it hands back first, before replaying or purging, with one
``basic.nack`` (requeue) each in the order it read them, and closes the channel only once the
broker shows them all ready again.

Why so, as measured on RabbitMQ 3.10 (tests/test_dead_cli.py): a quorum queue puts returned
messages at its back, in the order of the returns, behind anything that arrived since they
were taken (a classic queue puts them back where they were); a channel closed, or a
``basic.nack`` with ``multiple``, returns more than 32 held messages in a scrambled order, as
do returns of messages taken with ``basic.get``. So the queue keeps its order as long as no
dead letter arrives between the end of the read and the hand-back (milliseconds), and a
command killed half way loses nothing but may reorder what it held.

Each return adds one to a quorum queue's ``x-delivery-count`` of the message. omniroute
declares ``omniroute.dead`` without ``x-delivery-limit`` (``ingest.topology``), so the count
only grows and nothing is dropped for it; a delivery-limit policy on that queue would drop
dead letters after so many looks.

A replay happens once: the command reads before it replays, so a message that dies again
comes back after the read, for the next command. A crash between a replay's confirm and the
acknowledgement leaves the dead copy in the queue (a duplicate, which consumers drop by
``message_id``), never a loss.
"""

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Self

import aiormq
from aio_pika.abc import AbstractChannel
from aiormq.abc import DeliveredMessage

from config.dead import letters
from config.dead.letters import DeadLetter
from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.topology import DEAD, DEAD_QUEUE, EXCHANGES

#: replays whose confirms are awaited together
AT_ONCE = 100
#: the most messages one command holds (AMQP's largest prefetch window); more are left for
#: the next command
MAX_HELD = 65535
#: a read ends this long after the last delivery when fewer than the depth came (another
#: consumer of omniroute.dead took some)
QUIET = 1.0
#: how often the hand-back looks at the queue's depth
POLL = 0.02


@dataclass(frozen=True)
class Held:
    """A dead letter read and not settled yet: the broker's tag for it."""

    letter: DeadLetter
    tag: int


class DeadQueue:
    """``async with DeadQueue(bus) as dead``: the queue's messages held from ``read`` on,
    and handed back in their order by ``hand_back`` or when the block ends (all but those
    ``replay`` or ``remove`` took)."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._outer: AbstractChannel | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._held: list[Held] = []
        self._settled: set[int] = set()
        #: the queue's depth and consumers when ``read`` began
        self.depth = 0
        self.consumers = 0

    async def __aenter__(self) -> Self:
        self._outer = await self._bus.connection.channel()
        self._channel = await self._outer.get_underlay_channel()
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        try:
            if self._channel is not None and not self._channel.is_closed:
                await self.hand_back()
        finally:
            outer, self._outer, self._channel = self._outer, None, None
            if outer is not None and not outer.is_closed:
                await outer.close()

    @property
    def held(self) -> list[Held]:
        """Everything ``read`` took, settled or not."""
        return list(self._held)

    def _require(self) -> aiormq.abc.AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            raise TransientError("broker: the channel to omniroute.dead was closed")
        return self._channel

    async def read(self, keep_body: Callable[[DeadLetter], bool] | None = None) -> list[Held]:
        """Every message ready in the queue (at most ``MAX_HELD``), in the queue's order,
        held; what arrives while they are read is read too, until the queue is empty. Bodies
        only of those ``keep_body`` wants."""
        self.depth, self.consumers = await self._bus.queue_depth(DEAD_QUEUE)
        if self.depth == 0:
            return []
        channel = self._require()
        came = asyncio.Event()

        async def deliver(got: DeliveredMessage) -> None:
            letter = _letter(got, keep_body=False)
            if keep_body is not None and keep_body(letter):
                letter = _letter(got, keep_body=True)
            self._held.append(Held(letter, got.delivery_tag or 0))
            came.set()

        timeout = self._bus.settings.publish_timeout
        try:
            await channel.basic_qos(prefetch_count=MAX_HELD, timeout=timeout)
            ok = await channel.basic_consume(DEAD_QUEUE, deliver, no_ack=False, timeout=timeout)
            while len(self._held) < MAX_HELD:
                came.clear()
                if len(self._held) >= self.depth and await self._ready() == 0:
                    break
                try:
                    async with asyncio.timeout(QUIET):
                        await came.wait()
                except TimeoutError:
                    break  # another consumer holds the rest
            await channel.basic_cancel(ok.consumer_tag or "", timeout=timeout)
        except (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransientError(f"broker: reading {DEAD_QUEUE} failed: {exc!r}") from exc
        return list(self._held)

    async def _ready(self) -> int:
        return (await self._bus.queue_depth(DEAD_QUEUE))[0]

    async def hand_back(self, keep: Sequence[Held] = ()) -> None:
        """Return every held message not settled (but those in ``keep``), one nack each in
        the order read, and wait (bounded) until the broker shows them ready again: closing
        earlier would let the broker return the rest itself, out of order. A quorum queue
        puts them behind anything that arrived since they were read, so a command hands back
        what it will not touch before it replays or purges anything."""
        kept = {held.tag for held in keep}
        rest = [h for h in self._held if h.tag not in self._settled and h.tag not in kept]
        if not rest:
            return
        channel = self._require()
        try:
            ready_before = await self._ready()
            for held in rest:
                await channel.basic_nack(held.tag, multiple=False, requeue=True)
            self._settled.update(held.tag for held in rest)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._bus.settings.publish_timeout + len(rest) / 1000
            # past the deadline, another consumer took some
            back = ready_before + len(rest)
            while await self._ready() < back and loop.time() < deadline:  # noqa: ASYNC110 -- a queue's depth has no event to wait on
                await asyncio.sleep(POLL)
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransientError(f"broker: handing back {DEAD_QUEUE} failed: {exc!r}") from exc

    async def remove(self, held: Held) -> None:
        """Take a held message off the queue for good."""
        try:
            await self._require().basic_ack(held.tag)
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransientError(f"broker: removing {held.letter.id} failed: {exc!r}") from exc
        self._settled.add(held.tag)

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


def _letter(got: DeliveredMessage, *, keep_body: bool) -> DeadLetter:
    props = got.header.properties
    return letters.read(
        got.body,
        props.headers,
        message_id=props.message_id,
        type_=props.message_type,
        content_type=props.content_type,
        timestamp=props.timestamp,
        keep_body=keep_body,
    )
