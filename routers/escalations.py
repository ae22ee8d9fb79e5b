"""Escalation (issue 16): a customer's message nobody answered within its team's first-response
time goes up the team's ``escalate_to`` chain.

A message routed to a team with a ``first_response`` time for its channel waits in the
``waiting`` table until ``route.respond_by`` (counted in that team's opening hours,
``routers.first_response``); any answer to that customer stops it (``routers.state.
record_reply``). ``EscalationTimers`` (``routers.timers``: durable, once across instances)
fires the due ones: it publishes ``sla.breached`` on ``omniroute.events`` and routes the
message again to the team's ``escalate_to`` (a team, or ``agent:<id>``) with reason
``escalated``, ``attempt`` one more, ``previous`` the route it had, as ``<id>#<attempt>``;
an agent escalated to has it as their assignment (their load until they answer; never an
offer), in place of the one the message had (``routers.store.routed_log.assign_escalated``).
An escalation to a team with its own first-response time waits again, up the chain, at
most ``routing.max_escalations`` levels; at the end of the chain (or past that limit)
``sla.breached`` is still published, and the message stays where it is. A message with an
offer still open (``routers.offers``) escalates once the offer has ended (it times out
within ``routing.offer_timeout``), so that the two never publish one ``<id>#<attempt>``
with two routes; an offer that opens again meanwhile (a decline after an acceptance) ends:
the escalation supersedes it.
"""

from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import Connection, bindparam, func, or_, select, update

from ingest.schema import (
    InboundMessage,
    PreviousRoute,
    Route,
    RoutedMessage,
    SlaBreached,
)
from ingest.topology import EVENTS, ROUTED
from routers import first_response
from routers.availability import team_schedule
from routers.directory import AgentRecord, TeamRecord
from routers.models import Assignment, RoutedRecord, Waiting
from routers.settings import RoutingSettings
from routers.store import routed_log
from routers.store.values import aware, utc
from routers.timers import RETRY, TimerWorker, unreadable

log = structlog.get_logger("omniroute.escalations")
_wait, _record, _assign = Waiting.__table__.c, RoutedRecord.__table__.c, Assignment.__table__.c
_DUE = _wait.due_at.is_not(None) & _wait.answered_at.is_(None)
#: an offer of the message still open (``routers.offers``: due, or taken by the offer
#: worker, whose due time stays set until it closed it). Its message waits for the offer to
#: end: the two workers would both publish ``<id>#<attempt + 1>``, with different routes
#: under one AMQP message_id, and a consumer deduplicating on it would drop one
_OFFERED = (
    select(_assign.message_id)
    .where(
        _assign.message_id == _wait.message_id,
        _assign.offer_due_at.is_not(None),
        _assign.accepted_at.is_(None),
        or_(_assign.closed_at.is_(None), _assign.outcome == "declined"),
    )
    .exists()
)
_READY = _DUE & ~_OFFERED


@dataclass(frozen=True)
class Due:
    """One message whose first answer is overdue, as it was last routed."""

    message: InboundMessage
    customer_id: str | None
    team_id: str
    level: int
    due_at: datetime
    attempt: int
    previous: PreviousRoute


@dataclass(frozen=True)
class Step:
    """What one overdue message does: the event, and the route and next wait if any."""

    due: Due
    breached: SlaBreached
    routed: RoutedMessage | None
    next_team: str | None = None
    next_due: datetime | None = None


class EscalationTimers(TimerWorker):
    name = "escalations"

    def _next_due(self, connection: Connection) -> datetime | None:
        found = connection.scalar(select(func.min(_wait.due_at)).where(_READY))
        return aware(found) if found is not None else None

    async def _fire_batch(self) -> int:
        now = self._clock()
        taken: list[Due] = await self._database(lambda c: _take_due(c, now, self._batch))
        if not taken:
            return 0
        steps = await self._steps(taken, now)
        events = await self._bus.publish_many(
            EVENTS,
            [
                (s.breached.type, s.breached, f"sla:{s.due.message.id}:{s.breached.level}")
                for s in steps
            ],
        )
        routes = [s for s in steps if s.routed is not None]
        published = await self._bus.publish_many(
            ROUTED,
            [
                (r.route.routing_key, r, f"{r.message.id}#{r.route.attempt}")
                for s in routes
                if (r := s.routed) is not None
            ],
        )
        failed = {s.due.message.id for s, f in zip(steps, events, strict=True) if f is not None}
        failed |= {s.due.message.id for s, f in zip(routes, published, strict=True) if f}
        for message_id in sorted(failed):  # fired again after RETRY, with the same ids
            log.warning("escalations.publish_failed", message_id=message_id)
        done = [s for s in steps if s.due.message.id not in failed]
        if done:
            await self._database(lambda c: _fired(c, done, now))
        self._recorded([s.routed for s in done if s.routed is not None])
        for step in done:
            log.info(
                "escalations.breached",
                message_id=step.due.message.id,
                team=step.breached.team,
                level=step.breached.level,
                route=step.breached.escalated_to,
            )
        if (metrics := self._metrics) is not None:  # issue 17
            for step in done:
                labels = (step.due.message.channel, metrics.teams(step.breached.team))
                metrics.sla_breached.labels(*labels).inc()
                if step.routed is not None:
                    metrics.escalations.labels(*labels).inc()
        self.fired += len(done)
        return len(taken)

    async def _steps(self, taken: list[Due], now: datetime) -> list[Step]:
        routing = self.routing
        directory = self._decider.directory
        teams = await directory.get_teams({d.team_id for d in taken})
        chain = {d.team_id: _target(teams.get(d.team_id)) for d in taken}
        named = {t for t in chain.values() if t is not None}
        teams |= await directory.get_teams({who for kind, who in named if kind == "team"})
        agents = await directory.get_agents({who for kind, who in named if kind == "agent"})
        decisions = await self._decider.decide_many([d.message for d in taken], context=False)
        steps = []
        for due, decision in zip(taken, decisions, strict=True):
            level = due.level + 1
            target = chain[due.team_id] if level <= routing.max_escalations else None
            route, next_team, next_due = _escalate(due, target, teams, agents, routing, now)
            steps.append(
                Step(
                    due=due,
                    breached=SlaBreached(
                        message_id=due.message.id,
                        customer_id=due.customer_id,
                        team=due.team_id,
                        due_at=due.due_at,
                        level=level,
                        escalated_to=route.routing_key if route is not None else None,
                        at=now,
                    ),
                    routed=None
                    if route is None
                    else RoutedMessage(
                        message=due.message, customer=decision.customer, route=route
                    ),
                    next_team=next_team,
                    next_due=next_due,
                )
            )
        return steps


def _target(team: TeamRecord | None) -> tuple[str, str] | None:
    if team is None or not team.escalate_to:
        return None
    try:
        return first_response.target(team.escalate_to)
    except ValueError:
        return None


def _escalate(
    due: Due,
    target: tuple[str, str] | None,
    teams: dict[str, TeamRecord | None],
    agents: dict[str, AgentRecord | None],
    routing: RoutingSettings,
    now: datetime,
) -> tuple[Route | None, str | None, datetime | None]:
    """The escalated route, and the team and time of the next level's wait (if any)."""
    if target is None:
        return None, None, None
    kind, who = target
    if (kind == "team" and teams.get(who) is None) or (kind == "agent" and agents.get(who) is None):
        # the import checks teams; an agent is checked only here (agents come after teams)
        log.error("escalations.unknown_target", team=due.team_id, escalate_to=f"{kind}:{who}")
        return None, None, None
    late = f"no answer by {due.due_at.isoformat()} (team {due.team_id})"
    step = f"escalation: {late}, level {due.level + 1}"
    route = Route(
        kind="team" if kind == "team" else "agent",
        target=who,
        reason="escalated",
        decided_at=now,
        attempt=due.attempt + 1,
        previous=due.previous,
        steps=[step],
    )
    if kind == "agent":
        agent = agents[who]
        return route.model_copy(update={"fallback_team": agent and agent.team_id}), None, None
    team = teams[who]
    schedule = team_schedule(team, routing.timezone) if team is not None else None
    next_due = first_response.respond_by(team, schedule, due.message.channel, now)
    status = schedule.status(now) if schedule is not None else None
    opens_at = status.opens_at if status is not None and not status.open else None
    route = route.model_copy(update={"respond_by": next_due, "opens_at": opens_at})
    return route, (who if next_due is not None else None), next_due


def _take_due(connection: Connection, now: datetime, limit: int) -> list[Due]:
    """Take up to ``limit`` overdue messages by pushing their due time ``RETRY`` ahead
    (``routers.timers``), with their routed record."""
    due_now = (
        select(_wait.message_id)
        .where(_READY, _wait.due_at <= utc(now))
        .order_by(_wait.due_at)
        .limit(limit)
    )
    if connection.dialect.name == "sqlite":
        # a write first: the rows below are then read under SQLite's one write lock, so two
        # workers on one file never take the same rows
        connection.execute(
            update(Waiting)
            .where(_wait.message_id.in_(due_now.scalar_subquery()))
            .values(level=_wait.level)
        )
    query = (
        select(
            _wait.message_id,
            _wait.customer_id,
            _wait.team_id,
            _wait.level,
            _wait.due_at,
            _wait.message,
            _record.route_kind,
            _record.route_target,
            _record.reason,
            _record.attempt,
        )
        .join_from(Waiting.__table__, RoutedRecord.__table__, _record.id == _wait.message_id)
        .where(_READY, _wait.due_at <= utc(now))
        .order_by(_wait.due_at)
        .limit(limit)
    )
    if connection.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True, of=Waiting.__table__)
    rows = connection.execute(query).all()
    if not rows:
        _close_orphans(connection, now)
        return []
    connection.execute(
        update(Waiting)
        .where(_wait.message_id.in_([r.message_id for r in rows]))
        .values(due_at=utc(now + RETRY))
    )
    taken = []
    for r in rows:
        try:
            message = InboundMessage.model_validate_json(r.message)
        except ValueError as exc:  # e.g. written by a newer omniroute: not retried for ever
            log.error("escalations.unreadable", message_id=r.message_id, error=unreadable(exc))
            connection.execute(
                update(Waiting).where(_wait.message_id == r.message_id).values(due_at=None)
            )
            continue
        taken.append(
            Due(
                message=message,
                customer_id=r.customer_id,
                team_id=r.team_id,
                level=int(r.level),
                due_at=aware(r.due_at),
                attempt=int(r.attempt or 1),
                previous=PreviousRoute(kind=r.route_kind, target=r.route_target, reason=r.reason),
            )
        )
    return taken


def _close_orphans(connection: Connection, now: datetime) -> None:
    """A wait whose routed record was pruned (``routing.routed_log_days``) cannot say where
    the message went: it ends, never retried for ever."""
    connection.execute(
        update(Waiting)
        .where(
            _DUE,
            _wait.due_at <= utc(now),
            ~select(_record.id).where(_record.id == _wait.message_id).exists(),
        )
        .values(due_at=None)
    )


def _fired(connection: Connection, done: list[Step], now: datetime) -> None:
    """The next level waits (or none), the record names the new route, an open offer ends,
    and an agent escalated to has the message as an assignment (with no offer)."""
    connection.execute(
        update(Waiting)
        .where(_wait.message_id == bindparam("mid"))
        .values(
            level=bindparam("new_level"), team_id=bindparam("new_team"), due_at=bindparam("new_due")
        ),
        [
            {
                "mid": s.due.message.id,
                "new_level": s.breached.level,
                "new_team": s.next_team or s.due.team_id,
                "new_due": utc(s.next_due) if s.next_due is not None else None,
            }
            for s in done
        ],
        execution_options={"synchronize_session": False},
    )
    moved = [s.routed for s in done if s.routed is not None]
    if not moved:
        return
    connection.execute(
        update(RoutedRecord)
        .where(_record.id == bindparam("mid"))
        .values(
            route_kind=bindparam("new_kind"),
            route_target=bindparam("new_target"),
            reason=bindparam("new_reason"),
            attempt=bindparam("new_attempt"),
        ),
        [
            {
                "mid": r.message.id,
                "new_kind": r.route.kind,
                "new_target": r.route.target,
                "new_reason": r.route.reason,
                "new_attempt": r.route.attempt,
            }
            for r in moved
        ],
        execution_options={"synchronize_session": False},
    )
    connection.execute(
        update(Assignment)
        .where(
            _assign.message_id.in_([r.message.id for r in moved]),
            _assign.offer_due_at.is_not(None),
            _assign.accepted_at.is_(None),
        )
        .values(
            offer_due_at=None,
            message=None,
            outcome="escalated",
            closed_at=func.coalesce(_assign.closed_at, utc(now)),
        )
    )
    # the agent's load, listed as theirs, until they answer the customer (issue 15)
    routed_log.assign_escalated(connection, moved)
