"""Read access to the customer directory: who is this sender, which team, which agent.

Every lookup is by primary key or unique index. Identities are normalised the same way
the importer stored them (``ingest.identities``), so any spelling of a number matches.
``DirectoryCache`` keeps answers (a miss too) for a few seconds: the directory changes by
import, not per message, and a changed directory is seen once the entries expire.
"""

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import date
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, Select, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.identities import InvalidIdentity, normalise
from ingest.schema import Identity
from routers.models import Agent, CompanyHoliday, Customer, CustomerIdentity, Team
from routers.store.expiring import Expiring, read_many
from routers.store.transactions import Transactions

log = structlog.get_logger("omniroute.directory")


@dataclass(frozen=True)
class CustomerRecord:
    id: str
    name: str
    team_id: str | None
    #: issue 16: the language of acknowledgements (None: ack.default_language)
    language: str | None = None


@dataclass(frozen=True)
class TeamRecord:
    id: str
    name: str
    dial: str | None
    email: str | None
    # issue 15: the team's calendar (``routers.availability.team_schedule``) and stand-in
    timezone: str | None = None
    hours: str | None = None
    holidays: str | None = None
    after_hours: str | None = None
    after_hours_dial: str | None = None
    #: holidays.csv's rows for the team: (day, name, hours or None)
    company_days: tuple[tuple[date, str, str | None], ...] = ()
    # issue 16: per-channel first-response times (routers.first_response) and escalation
    first_response: str | None = None
    escalate_to: str | None = None


@dataclass(frozen=True)
class AgentRecord:
    id: str
    name: str
    team_id: str | None
    dial: str | None
    active: bool
    deputy: str | None = None
    capacity: str | None = None
    hours: str | None = None


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
        found = await customer_by_key(session, kind, address)
        if found is not None:
            return found
    return None


async def customer_by_key(session: AsyncSession, kind: str, address: str) -> CustomerRecord | None:
    """The customer owning one normalised (kind, address), or None."""
    row = (
        await session.execute(
            select(Customer.id, Customer.name, Customer.team_id, Customer.language)
            .join(CustomerIdentity, CustomerIdentity.customer_id == Customer.id)
            .where(CustomerIdentity.kind == kind, CustomerIdentity.address == address)
        )
    ).first()
    return None if row is None else CustomerRecord(row.id, row.name, row.team_id, row.language)


def customers_by_keys(
    connection: Connection, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], CustomerRecord]:
    """``customer_by_key`` for many normalised (kind, address) pairs in one query."""
    if not keys:
        return {}
    kinds = tuple(sorted({kind for kind, _ in keys}))
    params: dict[str, Any] = {}
    for i, kind in enumerate(kinds):
        params[f"kind{i}"] = kind
        params[f"addresses{i}"] = [address for k, address in keys if k == kind]
    rows = connection.execute(_customers_of_kinds(len(kinds)), params).all()
    return {(r.kind, r.address): CustomerRecord(r.id, r.name, r.team_id, r.language) for r in rows}


@functools.cache
def _customers_of_kinds(kinds: int) -> Select[Any]:
    # one "kind = ? AND address IN (...)" per kind: SQLite scans the whole table for a
    # row-value "(kind, address) IN (VALUES ...)", but searches the key index for this
    identity, customer = CustomerIdentity.__table__.c, Customer.__table__.c
    return (
        select(
            identity.kind,
            identity.address,
            customer.id,
            customer.name,
            customer.team_id,
            customer.language,
        )
        .join_from(
            CustomerIdentity.__table__, Customer.__table__, identity.customer_id == customer.id
        )
        .where(
            or_(
                *(
                    and_(
                        identity.kind == bindparam(f"kind{i}"),
                        identity.address.in_(bindparam(f"addresses{i}", expanding=True)),
                    )
                    for i in range(kinds)
                )
            )
        )
    )


def agents_by_ids(connection: Connection, agent_ids: list[str]) -> dict[str, AgentRecord]:
    rows = connection.execute(_AGENTS, {"ids": agent_ids}).all()
    return {
        r.id: AgentRecord(
            r.id, r.name, r.team_id, r.dial, bool(r.active), r.deputy, r.capacity, r.hours
        )
        for r in rows
    }


def teams_by_ids(connection: Connection, team_ids: list[str]) -> dict[str, TeamRecord]:
    rows = connection.execute(_TEAMS, {"ids": team_ids}).all()
    days: dict[str, list[tuple[date, str, str | None]]] = {}
    if rows:  # a company day closes a team even with no weekly hours (always open else)
        for d in connection.execute(_TEAM_DAYS, {"ids": [r.id for r in rows]}):
            days.setdefault(d.team_id, []).append((d.day, d.name, d.hours))
    return {
        r.id: TeamRecord(
            r.id,
            r.name,
            r.dial,
            r.email,
            r.timezone,
            r.hours,
            r.holidays,
            r.after_hours,
            r.after_hours_dial,
            tuple(sorted(days.get(r.id, ()))),
            r.first_response,
            r.escalate_to,
        )
        for r in rows
    }


_agent, _team, _day = Agent.__table__.c, Team.__table__.c, CompanyHoliday.__table__.c
_AGENTS = select(
    _agent.id,
    _agent.name,
    _agent.team_id,
    _agent.dial,
    _agent.active,
    _agent.deputy,
    _agent.capacity,
    _agent.hours,
).where(_agent.id.in_(bindparam("ids", expanding=True)))
_TEAMS = select(
    _team.id,
    _team.name,
    _team.dial,
    _team.email,
    _team.timezone,
    _team.hours,
    _team.holidays,
    _team.after_hours,
    _team.after_hours_dial,
    _team.first_response,
    _team.escalate_to,
).where(_team.id.in_(bindparam("ids", expanding=True)))
_TEAM_DAYS = select(_day.team_id, _day.day, _day.name, _day.hours).where(
    _day.team_id.in_(bindparam("ids", expanding=True))
)

K = TypeVar("K")
V = TypeVar("V")


class DirectoryCache:
    """The decider's directory reads: customer by identity, team, agent.

    Each answer (a miss too) is fresh for ``ttl`` seconds. For another ``ttl`` after that
    it is still answered, while one background read refreshes it: a customer, identity,
    team or agent changed in the database is seen once ``ttl`` has passed and that read is
    done (by the second lookup after the change, at the latest after ``2 * ttl``), and a
    busy entry never makes a caller wait for the database. ``ttl=0`` reads the database
    every time. The keys of a batch are read by one query; a key another caller is reading
    is awaited, not read twice. Routing state (last agent, presence, thread owners) is not
    kept here.
    """

    def __init__(
        self,
        run: Transactions,
        ttl: float,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._run = run
        self._customers: Expiring[tuple[str, str], CustomerRecord | None] = Expiring(
            ttl, max_entries, clock
        )
        self._teams: Expiring[str, TeamRecord | None] = Expiring(ttl, max_entries, clock)
        self._agents: Expiring[str, AgentRecord | None] = Expiring(ttl, max_entries, clock)
        self._reads: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak refs

    async def find_customers(
        self, identities: list[Identity], region: str
    ) -> list[CustomerRecord | None]:
        """The customer of each sender (address first, then aliases); every key not cached
        is read by one query."""
        keyed = [lookup_keys(identity, region) for identity in identities]
        wanted = dict.fromkeys(key for keys in keyed for key in keys)
        known = await read_many(
            self._customers, wanted, self._reader(customers_by_keys), self._spawn
        )
        return [next((c for key in keys if (c := known[key]) is not None), None) for keys in keyed]

    async def get_agents(self, agent_ids: set[str]) -> dict[str, AgentRecord | None]:
        """Agents by id; the ones not cached are read by one query."""
        return await read_many(self._agents, agent_ids, self._reader(agents_by_ids), self._spawn)

    async def get_teams(self, team_ids: set[str]) -> dict[str, TeamRecord | None]:
        """Teams by id; the ones not cached are read by one query."""
        return await read_many(self._teams, team_ids, self._reader(teams_by_ids), self._spawn)

    def _reader(
        self, query: Callable[[Connection, list[K]], dict[K, V]]
    ) -> Callable[[list[K]], Awaitable[dict[K, V]]]:
        """``query`` on a connection of its own: a read shared by several callers must not
        hold any one caller's connection while they wait."""

        async def read(keys: list[K]) -> dict[K, V]:
            return await self._run.read(lambda connection: query(connection, keys))

        return read

    def _spawn(self, read: Coroutine[Any, Any, None]) -> "asyncio.Task[None]":
        task = asyncio.create_task(read, name="directory-read")
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)
        return task

    def clear(self) -> None:
        """Forget everything (after an import or a reload): the next lookups read the database."""
        for part in (self._customers, self._teams, self._agents):
            part.clear()

    def __len__(self) -> int:
        return len(self._customers) + len(self._teams) + len(self._agents)
