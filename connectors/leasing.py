"""The pollers' lease loop: poll a source only while this process holds its lease.

Sole purpose: one way for the email and X connectors to take a source's lease
(``ingest.protocols.Lease``), retrying every ``retry`` seconds with jitter; to say so in
``Health`` while another live instance holds it ("standby") or while it cannot be asked
(the connector's own ``down``); to notice a lease that was lost; and to give it up on the
way out, cancelled or not.

Log events, each under the connector's prefix (``email.``, ``twitter.``): ``lease_acquired``,
``standby`` (logged once per change, like the state) and ``lease_lost``. Every network call
is the ``Lease``'s own, under its own deadline.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from structlog.typing import FilteringBoundLogger

from ingest.backoff import jittered, pause
from ingest.errors import TransientError
from ingest.health import Health
from ingest.protocols import Lease


class LeaseKeeper:
    """Holds one source's lease (``key``) for one poller, reported as ``component``.

    ``wait`` suits a poller that checks between passes (X); ``serve`` a poller that must be
    interrupted the moment the lease is lost (an IMAP IDLE). Both notice a lost lease,
    log it and release it before asking again."""

    def __init__(
        self,
        lease: Lease,
        key: str,
        *,
        health: Health,
        component: str,
        down: Callable[[str], None],
        log: FilteringBoundLogger,
        prefix: str,
        retry: float,
    ) -> None:
        self._lease = lease
        self._key = key
        self._health = health
        self._component = component
        self._down = down
        self._log = log
        self._acquired_event = prefix + ".lease_acquired"
        self._standby_event = prefix + ".standby"
        self._lost_event = prefix + ".lease_lost"
        self._retry = retry
        self._lost: asyncio.Event | None = None

    async def wait(self, stop: asyncio.Event) -> asyncio.Event | None:
        """The held lease's ``lost`` event, at once when still held, else after attempts
        every ``retry`` seconds (with jitter); None once ``stop`` is set."""
        while not stop.is_set():
            lost = await self._take()
            if lost is not None:
                return lost
            await pause(jittered(self._retry), stop)
        return None

    async def serve(
        self, stop: asyncio.Event, poll: Callable[[asyncio.Event], Awaitable[None]]
    ) -> None:
        """Run ``poll(serving)`` whenever the lease is held, ``serving`` being set on ``stop``
        or on the lease's loss; after a loss, wait for the lease again. Returns once ``stop``
        is set or ``poll`` returned with the lease still held (an error retrying cannot fix),
        and releases the lease on every way out."""
        try:
            while (lost := await self.wait(stop)) is not None:
                async with _either(stop, lost) as serving:
                    await poll(serving)
                if not lost.is_set():
                    return
        finally:
            await self.release()

    async def release(self) -> None:
        """Give the lease up (idempotent, as ``Lease.release`` is)."""
        self._lost = None
        await self._lease.release(self._key)

    async def _take(self) -> asyncio.Event | None:
        """One attempt: the ``lost`` event while held, else None with the reason in ``Health``."""
        if self._lost is not None and not self._lost.is_set():
            return self._lost
        if self._lost is not None:
            self._log.warning(self._lost_event)
            await self.release()
        try:
            self._lost = await self._lease.acquire(self._key)
        except TransientError as exc:
            self._down(f"lease: {exc}")
            return None
        if self._lost is None:
            if self._health.set(self._component, "standby", "leased by another instance"):
                self._log.info(self._standby_event)
            return None
        self._log.info(self._acquired_event)
        return self._lost


@contextlib.asynccontextmanager
async def _either(*events: asyncio.Event) -> AsyncIterator[asyncio.Event]:
    """An event set as soon as any of ``events`` is (stop, or the lease lost)."""
    combined = asyncio.Event()

    async def relay(event: asyncio.Event) -> None:
        await event.wait()
        combined.set()

    relays = [asyncio.create_task(relay(event)) for event in events]
    try:
        yield combined
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
