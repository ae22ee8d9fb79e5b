"""Whether an agent can take a message now (issue 15): at work, not away, under capacity.

Pure, like the policy that reads it: ``AgentFacts`` is what the decider read about one
agent for one message (presence with its ``until``, the working calendar, the load on the
message's channel and the capacity for it, the deputy); ``absent`` and ``busy`` say why
the agent cannot take it, in the words ``route explain`` prints.

Capacity is written ``email=20;sms=5;whatsapp=5;twitter=10`` in agents.csv: messages on
that channel still awaiting the agent's answer, at most; a channel left out is unlimited.
"""

import contextlib
import functools
from dataclasses import dataclass
from datetime import date, datetime
from typing import get_args

import structlog

from ingest.schema import Channel
from routers.directory import AgentRecord, TeamRecord
from routers.schedule import (
    ALWAYS,
    CompanyDay,
    Schedule,
    Span,
    WeeklyHours,
    parse_spans,
    parse_timezone,
)

log = structlog.get_logger("omniroute.availability")

CHANNELS: tuple[str, ...] = get_args(Channel)
CAPACITY_MAX = 10_000


def parse_capacity(text: str | None) -> dict[str, int]:
    """``{"email": 20, "sms": 5}`` of ``email=20;sms=5``; ValueError with a one-line message
    for a user (an unknown channel, a count that is not a whole number from 0)."""
    limits: dict[str, int] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        channel, sep, count = (piece.strip() for piece in part.partition("="))
        if not sep or not channel:
            raise ValueError(f"capacity {part!r}: expected channel=count, e.g. email=20")
        if channel not in CHANNELS:
            raise ValueError(
                f"capacity {part!r}: unknown channel {channel!r} ({', '.join(CHANNELS)})"
            )
        if channel in limits:
            raise ValueError(f"capacity: {channel} is given twice")
        if not count.isdigit() or int(count) > CAPACITY_MAX:
            raise ValueError(f"capacity {part!r}: the count must be 0 to {CAPACITY_MAX}")
        limits[channel] = int(count)
    return limits


@functools.lru_cache(maxsize=4096)
def capacity_of(text: str | None) -> dict[str, int]:
    """``parse_capacity`` for the decider: a value the import would have refused counts as
    unlimited (logged), rather than stopping the agent's routing."""
    try:
        return parse_capacity(text)
    except ValueError as exc:
        log.warning("availability.capacity_ignored", error=str(exc))
        return {}


def format_capacity(limits: dict[str, int]) -> str:
    """The canonical text of ``parse_capacity``'s result, channels in a fixed order."""
    return ";".join(f"{c}={limits[c]}" for c in CHANNELS if c in limits)


@dataclass(frozen=True)
class AgentFacts:
    """One agent as the policy sees them for one message (its channel, its instant)."""

    id: str
    team_id: str | None
    active: bool
    presence: str
    #: away or offline until then; None: until the next status event
    until: datetime | None = None
    #: when the agent works (their own hours, else their team's); None: always
    schedule: Schedule | None = None
    #: open assignments on the message's channel, and the most allowed (None: unlimited)
    load: int = 0
    capacity: int | None = None
    #: who stands in while this agent is away or off work (never followed further)
    deputy: "AgentFacts | None" = None

    def absent(self, now: datetime) -> str | None:
        """Why the agent is not at work at ``now``, or None when they are."""
        if not self.active:
            return "deactivated"
        if self.presence != "available" and (self.until is None or self.until > now):
            if self.until is None:
                return self.presence
            until = self.until  # shown in the agent's own zone where their calendar gives one
            if self.schedule is not None:
                with contextlib.suppress(OverflowError):  # year 9999 east of UTC
                    until = until.astimezone(self.schedule.timezone)
            return f"{self.presence} until {until.isoformat(timespec='minutes')}"
        if self.schedule is not None:
            status = self.schedule.status(now)
            if not status.open:
                return "off work (" + self.schedule.describe(now) + ")"
        return None

    def busy(self) -> str | None:
        """Why the agent takes no more on this channel now, or None."""
        if self.capacity is not None and self.load >= self.capacity:
            return f"at capacity ({self.load} of {self.capacity} open)"
        return None


@functools.lru_cache(maxsize=4096)
def team_schedule(team: TeamRecord, default_timezone: str) -> Schedule | None:
    """The team's calendar; None when it has none (always open). Built once per record (a
    changed record is a new key), since a ``Schedule`` caches its days as it is asked.
    A value the import would have refused (the database edited by hand) is logged and
    left out rather than stopping the routing of the team's customers."""
    if not (team.hours or team.holidays or team.company_days):
        return None
    return _schedule(team, team.hours, default_timezone)


@functools.lru_cache(maxsize=4096)
def agent_schedule(
    agent: AgentRecord, team: TeamRecord | None, default_timezone: str
) -> Schedule | None:
    """The agent's own hours in their team's zone and holidays, else the team's calendar."""
    if not agent.hours:
        return team_schedule(team, default_timezone) if team is not None else None
    return _schedule(team, agent.hours, default_timezone, agent=agent.id)


def _schedule(
    team: TeamRecord | None, hours: str | None, default_timezone: str, agent: str | None = None
) -> Schedule | None:
    """``hours`` in the team's zone with its holidays; ``agent``: the hours are that agent's
    own, so a team's half day counts only where it meets them."""
    who = f"agent {agent}" if agent else f"team {team.id if team else '?'}"
    try:
        zone = parse_timezone((team.timezone if team else None) or default_timezone)
        weekly = WeeklyHours.parse(hours) if hours else ALWAYS
        days = tuple(
            CompanyDay(
                day,
                name,
                _within(parse_spans(spans), weekly, day, own=agent is not None) if spans else None,
            )
            for day, name, spans in (team.company_days if team else ())
        )
        return Schedule(zone, weekly, (team.holidays if team else None) or None, days)
    except ValueError as exc:
        log.warning("availability.calendar_ignored", who=who, error=str(exc))
        return None


def _within(spans: tuple[Span, ...], weekly: WeeklyHours, day: date, own: bool) -> tuple[Span, ...]:
    """A team's half day for an agent with their own hours: the part of the half day they
    work (an agent on 13:00-22:00 does not work a half day of 09:00-13:00). For the team
    itself, the half day's hours stand as given."""
    if not own:
        return spans
    shared = [
        Span(max(a.start, b.start), min(a.end, b.end))
        for a in spans
        for b in weekly.days[day.weekday()]
        if min(a.end, b.end) > max(a.start, b.start)
    ]
    return tuple(shared)
