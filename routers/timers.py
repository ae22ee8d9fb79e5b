"""Durable timers (issue 16): rows in the directory database with a due time, fired by a
worker in every instance that runs the ``timers`` component.

``TimerWorker`` is the loop they share: fire what is due in batches, then sleep until the
next due time (at most ``max_sleep``), woken early by ``nudge()`` when this process writes a
nearer one, and on PostgreSQL by a ``NOTIFY omniroute_timers`` from any process
(``notify``: a decline, made due at once by another instance's events worker, is fired
within a second, not after ``max_sleep``). A subclass takes its due rows so that no other
instance fires them meanwhile (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite a write
first, under the database's one write lock), pushes their due time ``RETRY`` ahead,
publishes, then closes them: a crash in between fires them again after ``RETRY`` with the
same message ids (at least once, deduplicated downstream by ``message_id``), and a timer
due while the daemon was down fires at start. A directory outage is waited out with
backoff; the directory's own health shows it.
"""

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.backoff import Backoff
from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.recent import RecentDecisions
from ingest.schema import RoutedMessage, utcnow
from routers.decider import DirectoryDecider
from routers.settings import RoutingSettings
from routers.store.transactions import transactions_of
from routers.wake import CHANNEL, SOON

#: how long a batch taken by one worker is left to it before another may fire it again
RETRY = timedelta(seconds=60)


def unreadable(exc: ValueError) -> str:
    """Why a stored message did not validate, without the values (a customer's address or
    text would be in pydantic's message): the fields and error types only."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return type(exc).__name__
    return "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('type')}" for e in errors()[:5]
    )


class TimerWorker(ABC):
    """The shared loop and what both timer kinds route with (the bus, the decider, the
    live routing settings); a subclass says what is due (``_next_due``) and fires a batch."""

    name = "timers"

    def __init__(
        self,
        *,
        bus: Bus,
        engine: AsyncEngine,
        decider: DirectoryDecider,
        routing: RoutingSettings,
        health: Health,
        batch: int = 100,
        max_sleep: float = SOON.total_seconds(),
        clock: Callable[[], datetime] = utcnow,
        metrics: Metrics | None = None,
    ) -> None:
        self._bus = bus
        self._decider = decider
        self.routing = routing  # replaced as a whole on reload
        self._metrics = metrics
        self._run = transactions_of(engine)
        self._engine = engine
        self._health = health
        self._batch = batch
        self._max_sleep = max_sleep
        self._clock = clock
        self._wake = asyncio.Event()
        self._log = structlog.get_logger(f"omniroute.{self.name}")
        self.fired = 0
        #: the status page's record of decisions (issue 17), when it is on: re-routes too
        self.recent: RecentDecisions | None = None

    def _recorded(self, routed: list[RoutedMessage]) -> None:
        if self.recent is not None:
            for item in routed:
                self.recent.add(item)

    def nudge(self) -> None:
        """A nearer due time was written in this process: look again now."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Fire due timers until ``stop``; an outage is waited out with backoff."""
        if self._engine.dialect.name != "postgresql":
            await self._fire_until(stop)
            return
        async with asyncio.TaskGroup() as tasks:
            listening = tasks.create_task(self._listen(stop))
            await self._fire_until(stop)
            listening.cancel()

    async def _listen(self, stop: asyncio.Event) -> None:
        """LISTEN on a connection of its own, again after it is lost (with backoff); each
        notification, and each new connection (what was written meanwhile), is a nudge."""
        backoff = Backoff(1.0, 30.0)
        while not stop.is_set():
            lost = asyncio.Event()
            try:
                async with asyncio.timeout(30):
                    connection = await self._engine.connect()
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                self._log.info(f"{self.name}.listen_failed", error=str(exc)[:300])
                await self._sleep(backoff.next(), stop)
                continue
            try:
                driver: Any = (await connection.get_raw_connection()).driver_connection
                await driver.add_listener(CHANNEL, lambda *_: self.nudge())
                driver.add_termination_listener(lambda *_, gone=lost: gone.set())
                backoff.reset()
                self.nudge()
                await _first(stop.wait(), lost.wait())
            except Exception as exc:  # asyncpg's own errors too: the timers go on without it
                self._log.info(f"{self.name}.listen_lost", error=str(exc)[:300])
                await self._sleep(backoff.next(), stop)
            finally:
                # never back into the pool: a pooled connection would go on listening
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(5):
                        await connection.invalidate()

    async def _fire_until(self, stop: asyncio.Event) -> None:
        backoff, failing = Backoff(1.0, 30.0), False
        self._health.set(self.name, "up")
        try:
            while not stop.is_set():
                self._wake.clear()  # before looking: a nudge from here on is not lost
                try:
                    await self.drain(stop)
                    wait = await self._until_next()
                except TransientError as exc:
                    # a core worker marked down would have the watchdog restart the daemon,
                    # which cannot help against a directory outage
                    if not failing:
                        self._log.warning(f"{self.name}.failing", error=str(exc)[:300])
                    failing, wait = True, backoff.next()
                except Exception:  # a bug: logged, retried later, the daemon goes on
                    self._log.exception(f"{self.name}.bug")
                    failing, wait = True, backoff.next()
                else:
                    if failing:
                        self._log.info(f"{self.name}.recovered")
                    failing = False
                    backoff.reset()
                await self._sleep(wait, stop)
        finally:
            self._health.set(self.name, "stopped")

    async def drain(self, stop: asyncio.Event | None = None) -> int:
        """Fire every timer due now, or until ``stop`` (a backlog of thousands must not hold
        a SIGTERM up to shutdown_timeout: the batch in hand is finished, the rest fires at
        the next start); how many fired."""
        fired = 0
        while not (stop is not None and stop.is_set()) and (done := await self._fire_batch()) > 0:
            fired += done
        return fired

    @abstractmethod
    async def _fire_batch(self) -> int:
        """Take, fire and close one batch of due timers; how many were taken."""

    @abstractmethod
    def _next_due(self, connection: Connection) -> datetime | None:
        """The nearest due time of an open timer, or None."""

    async def _sleep(self, seconds: float, stop: asyncio.Event) -> None:
        await _first(stop.wait(), self._wake.wait(), timeout=seconds)

    async def _until_next(self) -> float:
        nearest: datetime | None = await self._database(self._next_due)
        if nearest is None:
            return self._max_sleep
        return min(self._max_sleep, max(0.0, (nearest - self._clock()).total_seconds()))

    async def _database(self, work: Any) -> Any:
        try:
            return await self._run(work)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc


async def _first(*waits: Coroutine[Any, Any, Any], timeout: float | None = None) -> None:
    """Until the first of ``waits`` is done (or ``timeout``); the others are cancelled."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
