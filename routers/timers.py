"""Durable timers (issue 16): rows in the directory database with a due time, fired by a
worker in every instance that runs the ``timers`` component.

``TimerWorker`` is the loop they share: fire what is due in batches, then sleep until the
next due time (at most ``max_sleep``), woken early by ``nudge()`` when this process writes a
nearer one. A subclass takes its due rows so that no other instance fires them meanwhile
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on SQLite a write first, under the database's
one write lock), pushes their due time ``RETRY`` ahead, publishes, then closes them: a
crash in between fires them again after ``RETRY`` with the same message ids (at least
once, deduplicated downstream by ``message_id``), and a timer due while the daemon was
down fires at start. A directory outage is waited out with backoff; the directory's own
health shows it.
"""

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.backoff import Backoff
from ingest.errors import TransientError
from ingest.health import Health
from ingest.schema import utcnow
from routers.store.transactions import transactions_of

#: how long a batch taken by one worker is left to it before another may fire it again
RETRY = timedelta(seconds=60)


class TimerWorker:
    """The shared loop; a subclass says what is due (``_next_due``) and fires a batch."""

    name = "timers"

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        health: Health,
        batch: int = 100,
        max_sleep: float = 30.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._run = transactions_of(engine)
        self._health = health
        self._batch = batch
        self._max_sleep = max_sleep
        self._clock = clock
        self._wake = asyncio.Event()
        self._log = structlog.get_logger(f"omniroute.{self.name}")
        self.fired = 0

    def nudge(self) -> None:
        """A nearer due time was written in this process: look again now."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Fire due timers until ``stop``; an outage is waited out with backoff."""
        backoff, failing = Backoff(1.0, 30.0), False
        self._health.set(self.name, "up")
        try:
            while not stop.is_set():
                self._wake.clear()  # before looking: a nudge from here on is not lost
                try:
                    await self.drain()
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

    async def drain(self) -> int:
        """Fire every timer due now; how many fired."""
        fired = 0
        while (done := await self._fire_batch()) > 0:
            fired += done
        return fired

    async def _fire_batch(self) -> int:
        """Take, fire and close one batch of due timers; how many were taken."""
        raise NotImplementedError

    def _next_due(self, connection: Connection) -> datetime | None:
        """The nearest due time of an open timer, or None."""
        raise NotImplementedError

    async def _sleep(self, seconds: float, stop: asyncio.Event) -> None:
        waiting = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiting, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()

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
