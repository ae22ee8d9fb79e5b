"""Read access to the customer directory: who is this sender, which team, which agent.

Every lookup is by primary key or unique index. Identities are normalised the same way
the importer stored them (``ingest.identities``), so any spelling of a number matches.
"""

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.identities import InvalidIdentity, normalise
from ingest.schema import Identity
from routers.models import Agent, Customer, CustomerIdentity, Team


@dataclass(frozen=True)
class CustomerRecord:
    id: str
    name: str
    team_id: str | None


@dataclass(frozen=True)
class TeamRecord:
    id: str
    name: str
    dial: str | None
    email: str | None


@dataclass(frozen=True)
class AgentRecord:
    id: str
    name: str
    team_id: str | None
    dial: str | None
    active: bool


def lookup_keys(identity: Identity, region: str) -> list[tuple[str, str]]:
    """The (kind, address) pairs to try, in order: the address, then each alias."""
    keys: list[tuple[str, str]] = []
    for address in [identity.address, *identity.aliases]:
        try:
            key = (identity.kind, normalise(identity.kind, address, region))
        except InvalidIdentity:
            continue
        if key not in keys:
            keys.append(key)
    return keys


async def find_customer(
    session: AsyncSession, identity: Identity, region: str
) -> CustomerRecord | None:
    """The customer owning this identity (user id before handle for X), or None."""
    keys = lookup_keys(identity, region)
    if not keys:
        return None
    for kind, address in keys:
        row = (
            await session.execute(
                select(Customer.id, Customer.name, Customer.team_id)
                .join(CustomerIdentity, CustomerIdentity.customer_id == Customer.id)
                .where(CustomerIdentity.kind == kind, CustomerIdentity.address == address)
            )
        ).first()
        if row is not None:
            return CustomerRecord(id=row.id, name=row.name, team_id=row.team_id)
    return None


async def get_customer(session: AsyncSession, customer_id: str) -> CustomerRecord | None:
    row = await session.get(Customer, customer_id)
    return None if row is None else CustomerRecord(row.id, row.name, row.team_id)


async def get_team(session: AsyncSession, team_id: str) -> TeamRecord | None:
    row = await session.get(Team, team_id)
    return None if row is None else TeamRecord(row.id, row.name, row.dial, row.email)


async def get_agent(session: AsyncSession, agent_id: str) -> AgentRecord | None:
    row = await session.get(Agent, agent_id)
    if row is None:
        return None
    return AgentRecord(row.id, row.name, row.team_id, row.dial, bool(row.active))
