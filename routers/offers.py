"""Offers that time out (issue 16): a message routed to an agent on a channel of
``routing.offer_timeout`` is theirs only until its due time, unless they accept it.

The offer is the agent's row in ``assignments`` (``routers.store.routed_log`` writes it with
the routed record), with ``offer_due_at``. ``assignment.accepted``, or the agent's answer to
that customer, stops it; ``assignment.declined`` makes it due at once. ``OfferTimers`` fires
the due ones: the message is decided again without its thread owner or last agent (so the
team, or its after-hours team), with reason ``offer_timeout`` or ``declined``, ``attempt``
one more, ``previous`` the agent, and published as ``<id>#<attempt>`` so that ticket systems
deduplicating on ``message_id`` take it as new and can recall the agent's copy. The whole
message is kept with the offer (the routed record keeps only a short copy).

Timers are rows, so they survive a restart (one due while the daemon was down fires at
start) and every instance may run the worker: a batch of due rows is taken by pushing their
due time ``RETRY`` ahead in one transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite
writes one at a time), published, then closed. A crash in between fires that batch again
after ``RETRY``, with the same message ids: at least once, deduplicated downstream by
``message_id``. The
worker sleeps until the next due time, at most ``max_sleep``, and is woken early by
``nudge()`` when this process writes a nearer one (a decline, a new offer).
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import Connection, func, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.backoff import Backoff
from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.health import Health
from ingest.schema import InboundMessage, PreviousRoute, ReasonName, RoutedMessage, utcnow
from ingest.topology import ROUTED
from routers.decider import DirectoryDecider
from routers.models import Assignment, RoutedRecord
from routers.settings import RoutingSettings
from routers.store.transactions import transactions_of
from routers.store.values import aware, utc

log = structlog.get_logger("omniroute.offers")

#: how long a batch taken by one worker is left to it before another may fire it again
RETRY = timedelta(seconds=60)
_assign, _record = Assignment.__table__.c, RoutedRecord.__table__.c
_DUE = (_assign.offer_due_at.is_not(None)) & (_assign.accepted_at.is_(None))
_OPEN = or_(_assign.closed_at.is_(None), _assign.outcome == "declined")


@dataclass(frozen=True)
class Due:
    """One offer to end: the message as recorded, the agent, why, and which attempt."""

    message: InboundMessage
    agent_id: str
    attempt: int
    reason: ReasonName
    previous: PreviousRoute


class OfferTimers:
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
        max_sleep: float = 30.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._bus = bus
        self._run = transactions_of(engine)
        self._decider = decider
        self.routing = routing  # replaced as a whole on reload
        self._health = health
        self._batch = batch
        self._max_sleep = max_sleep
        self._clock = clock
        self._wake = asyncio.Event()
        self.fired = 0

    def nudge(self) -> None:
        """A nearer due time was written in this process: look again now."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Fire due offers until ``stop``; an outage is waited out with backoff."""
        backoff, failing = Backoff(1.0, 30.0), False
        self._health.set(self.name, "up")
        try:
            while not stop.is_set():
                self._wake.clear()  # before looking: a nudge from here on is not lost
                try:
                    await self.drain()
                    wait = await self._until_next()
                except TransientError as exc:
                    # the directory's own health shows the outage; a core worker marked down
                    # would have the watchdog restart the daemon, which cannot help
                    if not failing:
                        log.warning("offers.failing", error=str(exc)[:300])
                    failing, wait = True, backoff.next()
                except Exception:  # a bug: logged, retried later, the daemon goes on
                    log.exception("offers.bug")
                    failing, wait = True, backoff.next()
                else:
                    if failing:
                        log.info("offers.recovered")
                    failing = False
                    backoff.reset()
                await self._sleep(wait, stop)
        finally:
            self._health.set(self.name, "stopped")

    async def drain(self) -> int:
        """Fire every offer due now; how many were routed again."""
        fired = 0
        while (done := await self._fire_batch()) > 0:
            fired += done
        return fired

    async def _sleep(self, seconds: float, stop: asyncio.Event) -> None:
        waiting = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waiting, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()

    async def _until_next(self) -> float:
        nearest: datetime | None = await self._database(_next_due)
        if nearest is None:
            return self._max_sleep
        return min(self._max_sleep, max(0.0, (nearest - self._clock()).total_seconds()))

    async def _fire_batch(self) -> int:
        now = self._clock()
        pruned = now - timedelta(days=self.routing.routed_log_days)
        taken: list[Due] = await self._database(lambda c: _take_due(c, now, self._batch, pruned))
        if not taken:
            return 0
        routed = await self._reroute(taken)
        results = await self._bus.publish_many(
            ROUTED,
            [(r.route.routing_key, r, f"{r.message.id}#{r.route.attempt}") for r in routed],
        )
        done = [r for r, failure in zip(routed, results, strict=True) if failure is None]
        for item, failure in zip(routed, results, strict=True):
            if failure is not None:  # fired again after RETRY: the same id, deduplicated
                log.warning("offers.publish_failed", message_id=item.message.id, error=str(failure))
        if done:
            await self._database(lambda c: _fired(c, done, now))
        for item in done:
            log.info(
                "offers.rerouted",
                message_id=item.message.id,
                attempt=item.route.attempt,
                reason=item.route.reason,
                route=item.route.routing_key,
            )
        self.fired += len(done)
        return len(taken)

    async def _reroute(self, taken: list[Due]) -> list[RoutedMessage]:
        decisions = await self._decider.decide_many(
            [due.message for due in taken], without_agents=True
        )
        out = []
        for due, decision in zip(taken, decisions, strict=True):
            why = (
                f"{due.agent_id} declined it"
                if due.reason == "declined"
                else f"{due.agent_id} did not accept it in time"
            )
            route = decision.route.model_copy(
                update={
                    "reason": due.reason,
                    "attempt": due.attempt + 1,
                    "previous": due.previous,
                    "steps": [*decision.route.steps, f"offer: {why}, routed again"],
                }
            )
            out.append(RoutedMessage(message=due.message, customer=decision.customer, route=route))
        return out

    async def _database(self, work: Any) -> Any:
        try:
            return await self._run(work)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc


def _next_due(connection: Connection) -> datetime | None:
    found = connection.scalar(
        select(func.min(_assign.offer_due_at))
        .join_from(Assignment.__table__, RoutedRecord.__table__, _record.id == _assign.message_id)
        .where(_DUE, _OPEN)
    )
    return aware(found) if found is not None else None


def _take_due(
    connection: Connection, now: datetime, limit: int, pruned_before: datetime
) -> list[Due]:
    """Take up to ``limit`` due offers for this worker by moving their due time ``RETRY``
    ahead (rows another worker holds are skipped), with what re-routing them needs."""
    # an offer whose routed record was pruned (the record is kept routing.routed_log_days)
    # cannot say where it was: it is closed, never retried for ever. Only offers older than
    # that are looked at, so a backlog of fresh ones costs no lookup each; on SQLite this
    # write also comes first, so the rows below are read under the write lock (two workers
    # on one file never take the same offers: tests/test_timers_durable.py)
    connection.execute(
        update(Assignment)
        .where(
            _DUE,
            _OPEN,
            _assign.offer_due_at <= utc(now),
            _assign.assigned_at < utc(pruned_before),
            ~select(_record.id).where(_record.id == _assign.message_id).exists(),
        )
        .values(offer_due_at=None, outcome="expired", closed_at=utc(now))
    )
    query = (
        select(
            _assign.message_id,
            _assign.agent_id,
            _assign.attempt,
            _assign.outcome,
            _assign.message.label("offered"),
            _record.message,
            _record.route_kind,
            _record.route_target,
            _record.reason,
        )
        .join_from(Assignment.__table__, RoutedRecord.__table__, _record.id == _assign.message_id)
        .where(_DUE, _OPEN, _assign.offer_due_at <= utc(now))
        .order_by(_assign.offer_due_at)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=Assignment.__table__)
    rows = connection.execute(query).all()
    if not rows:
        return []
    connection.execute(
        update(Assignment)
        .where(Assignment.message_id.in_([r.message_id for r in rows]))
        .values(offer_due_at=utc(now + RETRY))
    )
    taken: list[Due] = []
    for r in rows:
        try:  # the whole message kept with the offer, else the record's short copy
            due = Due(
                message=InboundMessage.model_validate_json(r.offered or r.message),
                agent_id=r.agent_id,
                attempt=int(r.attempt or 1),
                reason="declined" if r.outcome == "declined" else "offer_timeout",
                previous=PreviousRoute(kind=r.route_kind, target=r.route_target, reason=r.reason),
            )
        except ValueError as exc:  # e.g. written by a newer omniroute: not retried for ever
            log.error("offers.unreadable", message_id=r.message_id, error=str(exc)[:300])
            connection.execute(
                update(Assignment)
                .where(Assignment.message_id == r.message_id)
                .values(offer_due_at=None, outcome="unreadable", closed_at=utc(now))
            )
            continue
        taken.append(due)
    return taken


def _fired(connection: Connection, done: list[RoutedMessage], now: datetime) -> None:
    """The offers ended: no timer, the agent's load freed, the record names the new route."""
    for item in done:
        ended = connection.execute(
            update(Assignment)
            .where(Assignment.message_id == item.message.id, Assignment.accepted_at.is_(None))
            .values(
                offer_due_at=None,
                outcome=item.route.reason,
                closed_at=func.coalesce(Assignment.closed_at, utc(now)),
                message=None,
            )
        )
        if not ended.rowcount:  # accepted while it was being routed again: both have it
            log.warning("offers.accepted_meanwhile", message_id=item.message.id)
            connection.execute(
                update(Assignment)
                .where(Assignment.message_id == item.message.id)
                .values(offer_due_at=None, message=None)
            )
        connection.execute(
            update(RoutedRecord)
            .where(RoutedRecord.id == item.message.id)
            .values(
                route_kind=item.route.kind,
                route_target=item.route.target,
                reason=item.route.reason,
            )
        )
