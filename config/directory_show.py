"""``omniroute directory show team|agent ID``: one record as the router sees it (issue 15).

A team: every column, its calendar (hours in its zone, holiday country, company days of
the next 60 days) and whether it is open now or when it opens. An agent: every column,
presence (the last ``agent.status``), who stands in, whether they are at work and their
open load per channel against their capacity. The calendars are built by the router's own
``routers.availability`` from the router's own records, so this says what routing does.
"""

import argparse
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from config.instants import instant
from config.settings import Settings
from ingest.errors import OmnirouteError
from ingest.schema import utcnow
from routers.availability import CHANNELS, agent_schedule, capacity_of, team_schedule
from routers.directory import TeamRecord, agents_by_ids, teams_by_ids
from routers.models import Agent, AgentPresence, Assignment, Team
from routers.schedule import Schedule
from routers.settings import RoutingSettings
from routers.store.values import aware, utc

AHEAD = timedelta(days=60)  # how far ahead a team's company days are listed


async def show(engine: AsyncEngine, args: argparse.Namespace, settings: Settings) -> int:
    at = instant(args.at, "--at") if args.at is not None else utcnow()
    async with engine.connect() as conn:
        if args.what == "team":
            lines = await _team(conn, args.id, settings.routing, at)
        else:
            lines = await _agent(conn, args.id, settings.routing, at)
    print(
        "\n".join(f"{key + ':':<18}{value}" if key else f"{'':<18}{value}" for key, value in lines)
    )
    return 0


Lines = list[tuple[str, str]]


async def _record(
    conn: AsyncConnection, model: type[Team] | type[Agent], kind: str, id_: str
) -> Lines:
    """Every column of the row, in the table's order (``team_id`` shown as ``team``)."""
    table: Any = model.__table__
    row = (await conn.execute(select(table).where(table.c.id == id_))).mappings().first()
    if row is None:
        raise OmnirouteError(f"no {kind} {id_!r} in the directory")
    return [
        (kind if c.name == "id" else c.name.removesuffix("_id"), _value(row[c.name]))
        for c in table.columns
    ]


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "-" if value is None or value == "" else str(value)


async def _calendar(conn: AsyncConnection, team_id: str) -> TeamRecord:
    """The router's own record of the team, its company days included."""
    return (await conn.run_sync(lambda sync: teams_by_ids(sync, [team_id])))[team_id]


def _now(schedule: Schedule | None, at: datetime) -> Lines:
    if schedule is None:
        return [("status", "open: no hours, holidays or company days (always open)")]
    lines = [("status", schedule.describe(at))]
    status = schedule.status(at)
    if not status.open and status.opens_at is not None:
        lines.append(("opens at", status.opens_at.isoformat()))
    return lines


async def _team(
    conn: AsyncConnection, team_id: str, routing: RoutingSettings, at: datetime
) -> Lines:
    lines = await _record(conn, Team, "team", team_id)
    team = await _calendar(conn, team_id)
    if team.timezone is None:
        lines.append(("zone in use", f"{routing.timezone} (routing.timezone)"))
    schedule = team_schedule(team, routing.timezone)
    lines += _now(schedule, at)
    today = at.astimezone(schedule.timezone).date() if schedule else at.date()
    ahead = [d for d in team.company_days if today <= d[0] <= today + AHEAD]
    listed = [
        f"{day.isoformat()} {day:%a} {name} ({f'open {hours}' if hours else 'closed'})"
        for day, name, hours in ahead
    ] or [f"none in the next {AHEAD.days} days"]
    return lines + [("company days" if i == 0 else "", text) for i, text in enumerate(listed)]


async def _agent(
    conn: AsyncConnection, agent_id: str, routing: RoutingSettings, at: datetime
) -> Lines:
    lines = await _record(conn, Agent, "agent", agent_id)
    agent = (await conn.run_sync(lambda sync: agents_by_ids(sync, [agent_id])))[agent_id]
    team = await _calendar(conn, agent.team_id) if agent.team_id else None
    p = AgentPresence.__table__.c
    presence = (
        await conn.execute(select(AgentPresence.__table__).where(p.agent_id == agent_id))
    ).first()
    if presence is None:
        lines.append(("presence", "available (no agent.status yet)"))
        deputy = agent.deputy
    else:
        until = aware(presence.until) if presence.until else None
        said = f"{presence.status} since {aware(presence.at).isoformat()}"
        if until is not None:
            said += f", until {until.isoformat()}" + (
                " (passed: back at work)" if until <= at else ""
            )
        lines.append(("presence", said))
        deputy = presence.deputy or agent.deputy
    if deputy:
        source = (
            "the agent.status event" if presence is not None and presence.deputy else "agents.csv"
        )
        lines.append(("stands in", f"{deputy} ({source})"))
    if agent.hours is None and team is not None:
        lines.append(("hours in use", f"team {team.id}'s: {team.hours or 'always'}"))
    lines += _now(agent_schedule(agent, team, routing.timezone), at)
    lines.append(("load", await _load(conn, agent_id, agent.capacity, routing.load_window, at)))
    return lines


async def _load(
    conn: AsyncConnection, agent_id: str, capacity: str | None, window: timedelta, at: datetime
) -> str:
    """Unanswered messages per channel within the load window, against the capacity: the
    count the router compares (an assignment closed by a reply or assignment.closed is
    done)."""
    a = Assignment.__table__.c
    result = await conn.execute(
        select(a.channel, func.count())
        .where(a.agent_id == agent_id, a.closed_at.is_(None), a.assigned_at >= utc(at - window))
        .group_by(a.channel)
    )
    open_ = {channel: int(n) for channel, n in result.all()}
    limits = capacity_of(capacity)
    parts = [
        f"{c} {open_.get(c, 0)}" + (f" of {limits[c]}" if c in limits else "")
        for c in CHANNELS
        if c in open_ or c in limits
    ]
    hours = f"{window.total_seconds() / 3600:g} h"
    return f"{', '.join(parts) or 'none'} (unanswered, routed within routing.load_window {hours})"
