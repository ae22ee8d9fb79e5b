"""``omniroute agent status ID available|away|offline [--until T] [--deputy ID]``.

Publishes the same ``agent.status`` event a ticket system would (issue 15), to the events
exchange with the broker's confirm, so a supervisor can mark an agent away from a shell.
The agent and the deputy are looked up first: the events worker would dead-letter an
unknown agent (``unknown_agent``), long after the operator typed the name.
"""

import argparse

from sqlalchemy import select

from config.instants import instant
from config.settings import Settings
from ingest.bus import Bus
from ingest.errors import ConfigError, OmnirouteError
from ingest.schema import AgentStatus, new_id
from ingest.topology import EVENTS
from routers.models import Agent
from routers.store.engine import create_engine, require_current


async def run(args: argparse.Namespace, settings: Settings) -> int:
    until = instant(args.until, "--until") if args.until is not None else None
    if args.status == "available" and (until is not None or args.deputy is not None):
        raise ConfigError("--until and --deputy are for away or offline")
    if args.deputy is not None and args.deputy == args.id:
        raise ConfigError(f"--deputy {args.deputy!r}: an agent cannot stand in for themself")
    await _require_agents(
        settings, {args.id: "", **({args.deputy: "--deputy: "} if args.deputy else {})}
    )
    event = AgentStatus(agent_id=args.id, status=args.status, until=until, deputy=args.deputy)
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-agent-status")
    await bus.open()
    try:
        await bus.publish(EVENTS, event.type, event, message_id=new_id())
    finally:
        await bus.close()
    more = (f" until {until.isoformat()}" if until else "") + (
        f", deputy {args.deputy}" if args.deputy else ""
    )
    print(f"published agent.status: {args.id} {args.status}{more}")
    return 0


async def _require_agents(settings: Settings, ids: dict[str, str]) -> None:
    """Each of ``ids`` is an agent in the directory, or an error naming the first that is
    not, after the option it came from (``ids``' values)."""
    await require_current(settings.directory_url)
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        async with engine.connect() as conn:
            found = set((await conn.scalars(select(Agent.id).where(Agent.id.in_(list(ids))))).all())
    finally:
        await engine.dispose()
    for agent_id, option in ids.items():
        if agent_id not in found:
            raise OmnirouteError(f"{option}no agent {agent_id!r} in the directory")
