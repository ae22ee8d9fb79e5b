"""Offers that time out (issue 16): a message routed to an agent on a channel of
``routing.offer_timeout`` is theirs only until its due time, unless they accept it.

The offer is the agent's row in ``assignments`` (``routers.store.routed_log`` writes it with
the routed record), with ``offer_due_at``. ``assignment.accepted``, or the agent's answer to
that customer, stops it; ``assignment.declined`` makes it due at once. ``OfferTimers`` fires
the due ones (``routers.timers``: durable, once across instances): the message is decided
again without its thread owner or last agent (so the team, or its after-hours team), with
reason ``offer_timeout`` or ``declined``, ``attempt`` one more than the routed record's,
``previous`` the agent, its first answer still due when it was, and published as
``<id>#<attempt>`` so that ticket systems deduplicating on ``message_id`` take it as new
and can recall the agent's copy. The whole message is kept with the offer (the routed
record keeps only a short copy).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy import Connection, bindparam, case, func, or_, select, update

from ingest.schema import InboundMessage, PreviousRoute, ReasonName, RoutedMessage
from ingest.topology import ROUTED
from routers.models import Assignment, RoutedRecord, Waiting
from routers.store.values import aware, utc
from routers.timers import RETRY, TimerWorker, unreadable

log = structlog.get_logger("omniroute.offers")

_assign, _record, _wait = Assignment.__table__.c, RoutedRecord.__table__.c, Waiting.__table__.c
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
    #: the first answer's due time (issue 16's escalation), unchanged by routing again
    respond_by: datetime | None = None


class OfferTimers(TimerWorker):
    name = "timers"

    def _next_due(self, connection: Connection) -> datetime | None:
        return _next_due(connection)

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
        self._recorded(done)
        for item in done:
            log.info(
                "offers.rerouted",
                message_id=item.message.id,
                attempt=item.route.attempt,
                reason=item.route.reason,
                route=item.route.routing_key,
            )
        if (metrics := self._metrics) is not None:  # issue 17
            for item in done:
                metrics.offers_rerouted.labels(item.message.channel, item.route.reason).inc()
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
                    "respond_by": due.respond_by,
                    "steps": [*decision.route.steps, f"offer: {why}, routed again"],
                }
            )
            out.append(RoutedMessage(message=due.message, customer=decision.customer, route=route))
        return out


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
            _record.attempt.label("routed_attempt"),
            _wait.due_at.label("respond_by"),
        )
        .join_from(Assignment.__table__, RoutedRecord.__table__, _record.id == _assign.message_id)
        .outerjoin(Waiting.__table__, _wait.message_id == _assign.message_id)
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
                attempt=max(int(r.attempt or 1), int(r.routed_attempt or 1)),
                reason="declined" if r.outcome == "declined" else "offer_timeout",
                previous=PreviousRoute(kind=r.route_kind, target=r.route_target, reason=r.reason),
                respond_by=aware(r.respond_by) if r.respond_by is not None else None,
            )
        except ValueError as exc:  # e.g. written by a newer omniroute: not retried for ever
            log.error("offers.unreadable", message_id=r.message_id, error=unreadable(exc))
            connection.execute(
                update(Assignment)
                .where(Assignment.message_id == r.message_id)
                .values(offer_due_at=None, outcome="unreadable", closed_at=utc(now))
            )
            continue
        taken.append(due)
    return taken


def _fired(connection: Connection, done: list[RoutedMessage], now: datetime) -> None:
    """The offers ended: no timer, the agent's load freed, the record names the new route.
    One executemany per table (a batch of 100 took 170 ms one by one: bench/timers.py)."""
    ids = [item.message.id for item in done]
    # accepted while it was being routed again: both have it, and the acceptance stands
    accepted = set(
        connection.scalars(
            select(_assign.message_id).where(
                _assign.message_id.in_(ids), _assign.accepted_at.is_not(None)
            )
        )
    )
    for message_id in sorted(accepted):
        log.warning("offers.accepted_meanwhile", message_id=message_id)
    # only rows older than the attempt published: an escalation that fired meanwhile with
    # the same attempt (routers.escalations) has made the message the lead's, and its
    # assignment and route stand whichever of the two timers commits last
    connection.execute(
        update(Assignment)
        .where(_assign.message_id == bindparam("mid"), _assign.attempt < bindparam("b_attempt"))
        .values(
            offer_due_at=None,
            message=None,
            outcome=case((_assign.accepted_at.is_(None), bindparam("why")), else_=_assign.outcome),
            closed_at=case(
                (_assign.accepted_at.is_(None), func.coalesce(_assign.closed_at, utc(now))),
                else_=_assign.closed_at,
            ),
        ),
        [
            {"mid": item.message.id, "why": item.route.reason, "b_attempt": item.route.attempt}
            for item in done
        ],
        execution_options={"synchronize_session": False},
    )
    connection.execute(
        update(RoutedRecord)
        .where(_record.id == bindparam("mid"), _record.attempt < bindparam("new_attempt"))
        .values(
            route_kind=bindparam("new_kind"),
            route_target=bindparam("new_target"),
            reason=bindparam("new_reason"),
            attempt=bindparam("new_attempt"),
        ),
        [
            {
                "mid": item.message.id,
                "new_kind": item.route.kind,
                "new_target": item.route.target,
                "new_reason": item.route.reason,
                "new_attempt": item.route.attempt,
            }
            for item in done
        ],
        execution_options={"synchronize_session": False},
    )
