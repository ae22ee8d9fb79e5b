"""``omniroute directory search TEXT``: customers, agents and teams whose id or name contains
TEXT, and the customers owning an identity TEXT normalises to (issue 17).

Names match case-insensitively and Turkish-aware: I, İ, ı and i are one letter, so
``ISTANBUL`` finds ``Global Bank Istanbul`` and ``yılmaz`` finds ``Ayşe YILMAZ``. Identities
match exactly after normalisation (an email address, a phone number in any national or
international form, an X handle or user id) and are never printed: the customer is.
"""

import argparse

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from config.customer_cli import identity_keys
from config.settings import Settings
from ingest.errors import ConfigError
from routers.models import Agent, Customer, CustomerIdentity, Team

#: rows read per round trip while scanning customers' names
BATCH = 1000


def fold(text: str) -> str:
    """Case-folded, with the Turkish dotted and dotless i made one letter."""
    return text.translate(_TURKISH_I).casefold()


_TURKISH_I = str.maketrans({"İ": "i", "I": "i", "ı": "i"})


async def search(engine: AsyncEngine, args: argparse.Namespace, settings: Settings) -> int:
    text = args.text.strip()
    if not text:
        raise ConfigError("search for something: TEXT is empty")
    if args.limit < 1:
        raise ConfigError(f"--limit {args.limit}: give 1 or more")
    found: list[tuple[str, str, str, str, str]] = []  # kind, id, name, team, what matched
    async with engine.connect() as conn:
        for kind, id_, name, team, why in await _matches(conn, text, settings, args.limit + 1):
            found.append((kind, id_, name, team or "-", why))
    if not found:
        print(f"nothing matches {text!r}")
        return 1
    for kind, id_, name, team, why in found[: args.limit]:
        print(f"{kind:<9} {id_:<16} {name:<28} {team:<12} {why}")
    if len(found) > args.limit:
        print(f"(more not shown: raise --limit above {args.limit})")
    return 0


Match = tuple[str, str, str, str | None, str]


async def _matches(conn: AsyncConnection, text: str, settings: Settings, limit: int) -> list[Match]:
    """Teams, then agents, then customers by identity, then customers by id or name, each
    once, at most ``limit``."""
    needle = fold(text)
    found: dict[tuple[str, str], Match] = {}
    t, a = Team.__table__.c, Agent.__table__.c
    for row in await conn.execute(select(t.id, t.name).order_by(t.id)):
        if (why := _why(needle, row.id, row.name)) is not None:
            found[("team", row.id)] = ("team", row.id, row.name, None, why)
    for agent in await conn.execute(select(a.id, a.name, a.team_id).order_by(a.id)):
        if (why := _why(needle, agent.id, agent.name)) is not None:
            found[("agent", agent.id)] = ("agent", agent.id, agent.name, agent.team_id, why)
    c, i = Customer.__table__.c, CustomerIdentity.__table__.c
    for kind, address in identity_keys(text, settings.routing.default_region):
        owner = (
            await conn.execute(
                select(c.id, c.name, c.team_id)
                .join_from(Customer.__table__, CustomerIdentity.__table__, i.customer_id == c.id)
                .where(i.kind == kind, i.address == address)
            )
        ).first()
        if owner is not None:
            found.setdefault(
                ("customer", owner.id),
                ("customer", owner.id, owner.name, owner.team_id, f"{kind} identity"),
            )
    if len(found) < limit:
        result = await conn.stream(
            select(c.id, c.name, c.team_id).order_by(c.id).execution_options(yield_per=BATCH)
        )
        async for customer in result:
            if (why := _why(needle, customer.id, customer.name)) is not None:
                found.setdefault(
                    ("customer", customer.id),
                    ("customer", customer.id, customer.name, customer.team_id, why),
                )
                if len(found) >= limit:
                    break
        await result.close()
    return list(found.values())[:limit]


def _why(needle: str, id_: str, name: str) -> str | None:
    if needle in fold(id_):
        return "id"
    if needle in fold(name):
        return "name"
    return None
