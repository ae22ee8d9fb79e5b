"""The broker as tests use it (issue 14: one of each, not one per test module): rabbitmqctl,
a vhost of a test's own, a bus opened on it (``opened_bus``), ``publish_inbound`` as an
intake does, and a queue: ``take`` messages off it (``published``: what an intake
published; ``tally``: every wanted id, with its copies), ``purge`` it, its ``depth``,
``filled`` (at least so many ready) and ``wait_consumers``."""

import asyncio
import atexit
import contextlib
import json
import os
import shutil
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from aio_pika import DeliveryMode
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pydantic import BaseModel

from ingest.bus import Bus
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import InboundMessage
from ingest.settings import BusSettings
from ingest.topology import INBOUND, ROUTER_QUEUE
from tests.support.waiting import until as until_true

AMQP_HOST = os.environ.get("OMNIROUTE_TEST_AMQP_HOST", "127.0.0.1:5672")
#: how long ``take`` sleeps between two looks at an empty queue
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
    never used before and deleted after the block: queues never leak from one test (or
    module) to another. Made and deleted in batches (``_Vhosts``)."""
    name = _VHOSTS.take(prefix)
    try:
        yield name
    finally:
        _VHOSTS.spend(name)


def _erlang_names(names: Sequence[str]) -> str:
    return "[" + ",".join(f'<<"{name}">>' for name in names) + "]"


class _Vhosts:
    """Fresh vhosts in batches. Every ``rabbitmqctl`` run boots an Erlang VM (~0.5 s on a
    quiet machine, seconds under load), and a vhost took three (add_vhost, set_permissions,
    delete_vhost): 500 runs for the suite. One ``rabbitmqctl eval`` here creates ``BATCH``
    vhosts with guest's permissions (the broker's own rabbit_vhost:add and set_permissions,
    what add_vhost and set_permissions call) and deletes the ones spent since the last batch;
    each vhost still serves one test (or module) only, and at most one batch of spent ones
    waits for deletion. What is left goes when the process exits."""

    BATCH = 8
    ACTING_USER = '<<"omniroute-tests">>'

    def __init__(self) -> None:
        self._ready: dict[str, list[str]] = {}
        self._spent: list[str] = []
        self._lock = threading.Lock()
        atexit.register(self.close)

    def take(self, prefix: str) -> str:
        with self._lock:
            ready = self._ready.setdefault(prefix, [])
            if not ready:
                # the default prefix is a test's own vhost; the others serve a module once
                count = self.BATCH if prefix == "omniroute-test" else 1
                names = [f"{prefix}-{uuid.uuid4().hex[:10]}" for _ in range(count)]
                self._eval(create=names, delete=self._spent)
                self._spent = []
                ready.extend(names)
            return ready.pop()

    def spend(self, name: str) -> None:
        with self._lock:
            self._spent.append(name)

    def close(self) -> None:
        with self._lock:
            left = self._spent + [name for names in self._ready.values() for name in names]
            self._spent, self._ready = [], {}
        if left:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self._eval(create=[], delete=left)

    def _eval(self, *, create: Sequence[str], delete: Sequence[str]) -> None:
        who = self.ACTING_USER
        rabbitmqctl(
            "eval",
            f"[rabbit_vhost:delete(V, {who}) || V <- {_erlang_names(delete)}], "
            f"[begin ok = rabbit_vhost:add(V, {who}), "
            f'ok = rabbit_auth_backend_internal:set_permissions(<<"guest">>, V, '
            f'<<".*">>, <<".*">>, <<".*">>, {who}) end || V <- {_erlang_names(create)}], ok.',
        )


_VHOSTS = _Vhosts()


@contextlib.asynccontextmanager
async def opened_bus(
    url: str,
    *,
    settings: BusSettings | None = None,
    name: str = "test",
    health: Health | None = None,
    metrics: Metrics | None = None,
) -> AsyncIterator[Bus]:
    """A bus on ``url`` (``BusSettings()`` unless given), opened, which declares omniroute's
    topology there, and closed when the block ends."""
    bus = Bus(url, settings or BusSettings(), name=name, health=health, metrics=metrics)
    await bus.open()
    try:
        yield bus
    finally:
        await bus.close()


@dataclass(frozen=True)
class Taken:
    """A message taken off a queue, with what tests look at."""

    body: bytes
    routing_key: str
    message_id: str | None
    user_id: str | None
    headers: dict[str, Any]
    #: the AMQP ``type`` property (``omniroute.routed.v1``, say)
    message_type: str | None
    delivery_mode: DeliveryMode

    @classmethod
    def of(cls, message: AbstractIncomingMessage) -> "Taken":
        return cls(
            body=message.body,
            routing_key=message.routing_key or "",
            message_id=message.message_id,
            user_id=message.user_id,
            headers=dict(message.headers or {}),
            message_type=message.type,
            delivery_mode=message.delivery_mode,
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


async def tally(
    bus: Bus,
    queue: str,
    want: set[str],
    timeout: float,
    *,
    key: Callable[[Taken], str] = lambda taken: taken.message_id or "",
) -> dict[str, int]:
    """Take messages off ``queue`` until each of ``want`` came (``key`` names a message: its
    message id unless given), or ``timeout`` seconds passed; how many copies of each name
    came (names not wanted too). The caller asserts what is missing."""
    counts: dict[str, int] = {}

    def arrived(taken: Sequence[Taken]) -> bool:  # asked again after each message taken
        if taken:
            name = key(taken[-1])
            counts[name] = counts.get(name, 0) + 1
        return want <= counts.keys()

    await take(bus, queue, until=arrived, timeout=timeout, partial=True)
    return counts


async def publish_inbound(bus: Bus, messages: Sequence[InboundMessage], at_once: int = 250) -> None:
    """Publish ``messages`` to omniroute.inbound as an intake does (keyed by channel, the
    omniroute id as message id), ``at_once`` confirms awaited together."""
    for start in range(0, len(messages), at_once):
        await asyncio.gather(
            *(
                bus.publish(INBOUND, m.channel, m, message_id=m.id)
                for m in messages[start : start + at_once]
            )
        )


async def published(bus: Bus) -> list[InboundMessage]:
    """Everything an intake published that waits in ``omniroute.router`` now, taken off it."""
    return [m.model(InboundMessage) for m in await take(bus, ROUTER_QUEUE, quiet=0)]


async def purge(bus: Bus, *queues: str) -> None:
    """Empty ``queues``: a vhost shared by a module's tests starts each test empty."""
    channel = await bus.connection.channel()
    try:
        for queue in queues:
            await (await channel.get_queue(queue)).purge()
    finally:
        await channel.close()


async def depth(bus: Bus, queue: str) -> int:
    """The messages ready in ``queue`` now, asked on a channel of its own (a passive
    declare: never a cached answer)."""
    channel = await bus.connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await channel.close()


async def filled(
    bus: Bus,
    queue: str,
    n: int,
    timeout: float = 60.0,
    *,
    meanwhile: Callable[[], object] | None = None,
) -> None:
    """Wait (bounded) until at least ``n`` messages are ready in ``queue``: work done that
    far, by a daemon in another process, say. ``meanwhile()`` is called at each look (an
    ``assert`` that the process still runs)."""

    async def enough() -> bool:
        if meanwhile is not None:
            meanwhile()
        return (await bus.queue_depth(queue))[0] >= n

    await until_true(enough, timeout, f"{n} messages ready in {queue}")


async def wait_consumers(bus: Bus, queue: str, n: int = 1, timeout: float = 30.0) -> None:
    """Wait (bounded) until at least ``n`` consumers read ``queue``, e.g. a daemon started
    in another process."""

    async def consumed() -> bool:
        return (await bus.queue_depth(queue))[1] >= n

    await until_true(consumed, timeout, f"{n} consumers on {queue}")
