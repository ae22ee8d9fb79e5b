"""``omniroute directory delete customer|agent|team ID [--dry-run]`` (issue 17).

Refused, in one line naming what still refers to it, while anything does: a team with
agents or customers, another team's ``after_hours`` or ``escalate_to``, or the
configuration (``routing.default_team``, ``routing.address_teams``, ``[[routing.rules]]``);
an agent who is another agent's deputy (agents.csv's or an ``agent.status`` event's) or a
team's ``escalate_to agent:<id>``. What belongs to the record goes with it: a customer's
identities and last agent; an agent's presence and the last-agent rows naming them (their
customers go to their teams); a team's company days.
"""

import argparse
from typing import Any

from sqlalchemy import Delete, Select, delete, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from config.settings import Settings
from ingest.errors import OmnirouteError
from routers.models import (
    Agent,
    AgentPresence,
    CompanyHoliday,
    Customer,
    CustomerIdentity,
    LastAgent,
    Team,
)
from routers.settings import RoutingSettings

_MODELS: dict[str, type[Customer] | type[Agent] | type[Team]] = {
    "customer": Customer,
    "agent": Agent,
    "team": Team,
}


async def delete_record(engine: AsyncEngine, args: argparse.Namespace, settings: Settings) -> int:
    what, id_ = args.what, args.id
    async with engine.connect() as conn:
        if await conn.scalar(select(_MODELS[what].id).where(_MODELS[what].id == id_)) is None:
            raise OmnirouteError(f"no {what} {id_!r} in the directory")
        if what == "team":
            users = await _team_users(conn, id_, settings.routing)
        elif what == "agent":
            users = await _agent_users(conn, id_)
        else:
            users = []
        if users:
            raise OmnirouteError(
                f"{what} {id_!r} is still referred to by {', '.join(users)}: change those first"
            )
        goes = await _cascade(conn, what, id_)
        # a dry run is counted by the same statements, then rolled back
        await (conn.rollback() if args.dry_run else conn.commit())
    with_it = f" with {', '.join(goes)}" if goes else ""
    print(f"{'would delete' if args.dry_run else 'deleted'} {what} {id_}{with_it}")
    return 0


async def _team_users(conn: AsyncConnection, team_id: str, routing: RoutingSettings) -> list[str]:
    t, a, c = Team.__table__.c, Agent.__table__.c, Customer.__table__.c
    users = [f"agent {x}" for x in await _ids(conn, select(a.id).where(a.team_id == team_id))]
    customers = await _ids(conn, select(c.id).where(c.team_id == team_id))
    if customers:
        more = f" and {len(customers) - 3} more" if len(customers) > 3 else ""
        users.append(f"customer {', '.join(customers[:3])}{more}")
    users += [
        f"team {x}'s after_hours"
        for x in await _ids(conn, select(t.id).where(t.after_hours == team_id, t.id != team_id))
    ]
    users += [
        f"team {x}'s escalate_to"
        for x in await _ids(conn, select(t.id).where(t.escalate_to == team_id, t.id != team_id))
    ]
    if routing.default_team == team_id:
        users.append("routing.default_team")
    users += [
        f"routing.address_teams[{k!r}]" for k, v in routing.address_teams.items() if v == team_id
    ]
    users += [
        f"routing rule {rule.name!r}"
        for rule in routing.rules
        if rule.team == team_id or team_id in (rule.customer_team or ())
    ]
    return users


async def _agent_users(conn: AsyncConnection, agent_id: str) -> list[str]:
    t, a, p = Team.__table__.c, Agent.__table__.c, AgentPresence.__table__.c
    deputy_of = await _ids(conn, select(a.id).where(a.deputy == agent_id, a.id != agent_id))
    deputy_of += await _ids(conn, select(p.agent_id).where(p.deputy == agent_id))
    users = [f"agent {x} (deputy)" for x in dict.fromkeys(deputy_of) if x != agent_id]
    escalating = select(t.id).where(t.escalate_to == f"agent:{agent_id}")
    users += [f"team {x}'s escalate_to" for x in await _ids(conn, escalating)]
    return users


async def _cascade(conn: AsyncConnection, what: str, id_: str) -> list[str]:
    """Delete the record and what belongs to it; what went, counted."""
    steps: list[tuple[str, Delete]] = []
    if what == "customer":
        steps += [
            ("identities", delete(CustomerIdentity).where(CustomerIdentity.customer_id == id_)),
            ("last agent", delete(LastAgent).where(LastAgent.customer_id == id_)),
        ]
    elif what == "agent":
        steps += [
            ("presence", delete(AgentPresence).where(AgentPresence.agent_id == id_)),
            ("last-agent rows", delete(LastAgent).where(LastAgent.agent_id == id_)),
        ]
    else:
        steps.append(("company days", delete(CompanyHoliday).where(CompanyHoliday.team_id == id_)))
    goes = []
    for label, statement in steps:
        result = await conn.execute(statement)
        if count := getattr(result, "rowcount", 0):
            goes.append(f"{label} ({count})")
    model = _MODELS[what]
    await conn.execute(delete(model).where(model.id == id_))
    return goes


async def _ids(conn: AsyncConnection, statement: Select[Any]) -> list[str]:
    return [str(x) for x in (await conn.scalars(statement)).all()]
