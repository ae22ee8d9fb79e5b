"""The broker as tests use it (issue 14: one of each, not one per test module): rabbitmqctl,
a vhost of a test's own, and reading a queue: ``take`` messages off it (``published``: what
an intake published), its ``depth``, ``drained`` (nothing ready any more) and
``wait_consumers``."""

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import BaseModel

from ingest.bus import Bus
from ingest.schema import InboundMessage
from ingest.topology import ROUTER_QUEUE

AMQP_HOST = os.environ.get("OMNIROUTE_TEST_AMQP_HOST", "127.0.0.1:5672")
#: how long ``take`` and the waits sleep between two looks at an empty queue
POLL = 0.02

M = TypeVar("M", bound=BaseModel)


def rabbitmqctl(*args: str) -> str:
    """``rabbitmqctl -q args`` (bounded, failing on a non-zero exit); what it printed."""
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    done = subprocess.run(
        [ctl, "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def vhost_url(vhost: str, user: str = "guest", password: str = "guest") -> str:  # noqa: S107
    """The AMQP URL of ``vhost`` on the test broker, as ``user``."""
    return f"amqp://{user}:{password}@{AMQP_HOST}/{vhost}"


@contextlib.contextmanager
def fresh_vhost(prefix: str = "omniroute-test") -> Iterator[str]:
    """A vhost of its own (``prefix`` and a random suffix) on which guest may do anything,
    deleted when the block ends: queues never leak from one test (or module) to another."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


@dataclass(frozen=True)
class Taken:
    """A message taken off a queue, with what tests look at."""

    body: bytes
    routing_key: str
    message_id: str | None
    user_id: str | None
    headers: dict[str, Any]

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> "Taken":
        return cls(
            body=message.body,
            routing_key=message.routing_key or "",
            message_id=message.message_id,
            user_id=message.user_id,
            headers=dict(message.headers or {}),
        )

    def json(self) -> Any:
        return json.loads(self.body)

    def model(self, model: type[M]) -> M:
        return model.model_validate_json(self.body)


@contextlib.asynccontextmanager
async def _channel(source: Bus | AbstractChannel) -> AsyncIterator[AbstractChannel]:
    """``source`` itself when it is a channel; else a channel of the bus's own, closed after
    (bounded: a broker gone away must not hang the test's clean-up)."""
    if not isinstance(source, Bus):
        yield source
        return
    channel = await source.connection.channel()
    try:
        yield channel
    finally:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await channel.close()


async def take(
    source: Bus | AbstractChannel,
    queue: str,
    n: int | None = None,
    timeout: float = 10.0,
    *,
    until: Callable[[Sequence[Taken]], bool] | None = None,
    quiet: float | None = None,
    keep: Callable[[Taken], bool] | None = None,
    partial: bool = False,
) -> list[Taken]:
    """Take messages off ``queue`` (acknowledged as they are taken), in order, through
    ``source``: a bus (on a channel of its own) or an open channel (another user's, say).

    Stops at the first of: ``n`` messages taken; ``until(taken)`` true (asked once before
    the first take and once after each message taken, so it may count as it goes; true from
    the start, nothing is taken); with ``quiet``, the queue found empty ``quiet`` seconds
    after the last message taken (``quiet=0``: the first time it is found empty). Messages
    ``keep`` says no to are taken off the queue and dropped: neither counted nor returned.
    When ``timeout`` seconds pass first it raises ``TimeoutError`` saying how many it took,
    or, ``partial=True``, returns them.

    The deadline is checked between two ``basic.get``, never by cancelling one, so no
    message the broker already handed over is lost to a timeout.
    """
    if n is None and until is None and quiet is None:
        raise TypeError("take() needs n, until or quiet: when should it stop?")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = loop.time()
    taken: list[Taken] = []
    enough = until is not None and until(taken)
    async with _channel(source) as channel:
        reading = await channel.get_queue(queue)
        while not (enough or (n is not None and len(taken) >= n)):
            if loop.time() >= deadline:
                if partial:
                    break
                wanted = f" of {n}" if n is not None else ""
                raise TimeoutError(f"took {len(taken)}{wanted} off {queue} in {timeout} s")
            message = await reading.get(fail=False, no_ack=True, timeout=10)
            if message is None:
                if quiet is not None and loop.time() - last >= quiet:
                    break
                await asyncio.sleep(POLL)
                continue
            got = Taken.of(message)
            if keep is None or keep(got):
                taken.append(got)
                last = loop.time()
                enough = until is not None and until(taken)
    return taken


async def published(bus: Bus) -> list[InboundMessage]:
    """Everything an intake published that waits in ``omniroute.router`` now, taken off it."""
    return [m.model(InboundMessage) for m in await take(bus, ROUTER_QUEUE, quiet=0)]


async def depth(bus: Bus, queue: str) -> int:
    """The messages ready in ``queue`` now, asked on a channel of its own (a passive
    declare: never a cached answer)."""
    channel = await bus.connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


async def drained(bus: Bus, *queues: str, timeout: float = 15.0) -> None:
    """Wait (bounded) until nothing is ready in any of ``queues``, one after the other."""
    async with asyncio.timeout(timeout):
        for queue in queues:
            while (await bus.queue_depth(queue))[0]:
                await asyncio.sleep(POLL)


async def wait_consumers(bus: Bus, queue: str, n: int = 1, timeout: float = 30.0) -> None:
    """Wait (bounded) until at least ``n`` consumers read ``queue``, e.g. a daemon started
    in another process."""
    async with asyncio.timeout(timeout):
        while (await bus.queue_depth(queue))[1] < n:
            await asyncio.sleep(POLL)
