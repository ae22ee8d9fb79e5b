"""Read access to the customer directory: who is this sender, which team, which agent.

Every lookup is by primary key or unique index. Identities are normalised the same way
the importer stored them (``ingest.identities``), so any spelling of a number matches.
``DirectoryCache`` keeps answers (a miss too) for a few seconds: the directory changes by
import, not per message, and a changed directory is seen once the entries expire.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import ColumnElement, and_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ingest.errors import TransientError
from ingest.identities import InvalidIdentity, normalise
from ingest.schema import Identity
from routers.batching import Batcher
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
        found = await customer_by_key(session, kind, address)
        if found is not None:
            return found
    return None


async def customer_by_key(session: AsyncSession, kind: str, address: str) -> CustomerRecord | None:
    """The customer owning one normalised (kind, address), or None."""
    row = (
        await session.execute(
            select(Customer.id, Customer.name, Customer.team_id)
            .join(CustomerIdentity, CustomerIdentity.customer_id == Customer.id)
            .where(CustomerIdentity.kind == kind, CustomerIdentity.address == address)
        )
    ).first()
    return None if row is None else CustomerRecord(id=row.id, name=row.name, team_id=row.team_id)


async def get_team(session: AsyncSession, team_id: str) -> TeamRecord | None:
    row = (
        await session.execute(
            select(Team.id, Team.name, Team.dial, Team.email).where(Team.id == team_id)
        )
    ).first()
    return None if row is None else TeamRecord(row.id, row.name, row.dial, row.email)


async def get_agent(session: AsyncSession, agent_id: str) -> AgentRecord | None:
    row = (
        await session.execute(
            select(Agent.id, Agent.name, Agent.team_id, Agent.dial, Agent.active).where(
                Agent.id == agent_id
            )
        )
    ).first()
    if row is None:
        return None
    return AgentRecord(row.id, row.name, row.team_id, row.dial, bool(row.active))


async def customers_by_keys(
    session: AsyncSession, keys: list[tuple[str, str]]
) -> dict[tuple[str, str], CustomerRecord]:
    """``customer_by_key`` for many normalised (kind, address) pairs in one query."""
    if not keys:
        return {}
    rows = (
        await session.execute(
            select(
                CustomerIdentity.kind,
                CustomerIdentity.address,
                Customer.id,
                Customer.name,
                Customer.team_id,
            )
            .join(Customer, CustomerIdentity.customer_id == Customer.id)
            .where(or_(*(_of_kind(kind, keys) for kind in sorted({k for k, _ in keys}))))
        )
    ).all()
    return {(r.kind, r.address): CustomerRecord(r.id, r.name, r.team_id) for r in rows}


async def agents_by_ids(session: AsyncSession, agent_ids: list[str]) -> dict[str, AgentRecord]:
    rows = (
        await session.execute(
            select(Agent.id, Agent.name, Agent.team_id, Agent.dial, Agent.active).where(
                Agent.id.in_(agent_ids)
            )
        )
    ).all()
    return {r.id: AgentRecord(r.id, r.name, r.team_id, r.dial, bool(r.active)) for r in rows}


async def teams_by_ids(session: AsyncSession, team_ids: list[str]) -> dict[str, TeamRecord]:
    rows = (
        await session.execute(
            select(Team.id, Team.name, Team.dial, Team.email).where(Team.id.in_(team_ids))
        )
    ).all()
    return {r.id: TeamRecord(r.id, r.name, r.dial, r.email) for r in rows}


def _of_kind(kind: str, keys: list[tuple[str, str]]) -> ColumnElement[bool]:
    # one "kind = ? AND address IN (...)" per kind: SQLite scans the whole table for a
    # row-value "(kind, address) IN (VALUES ...)", but searches the key index for this
    addresses = [address for k, address in keys if k == kind]
    return and_(CustomerIdentity.kind == kind, CustomerIdentity.address.in_(addresses))


#: a session opened on first use: a batch answered from the cache opens none
SessionSource = Callable[[], Awaitable[AsyncSession]]

K = TypeVar("K")
V = TypeVar("V")


class _Expiring(Generic[K, V]):
    """A bounded map whose entries live ``ttl`` seconds; the oldest go first when full."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self.loading: dict[K, asyncio.Future[V]] = {}  # keys a caller is reading now

    def get(self, key: K) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return True, entry[1]
        return False, None

    def put(self, key: K, value: V) -> None:
        if self._ttl <= 0:
            return
        self._entries.pop(key, None)
        if len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (self._clock() + self._ttl, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


async def _many(
    cache: "_Expiring[K, V | None]",
    keys: Iterable[K],
    load: Callable[[list[K]], Awaitable[dict[K, V]]],
) -> dict[K, V | None]:
    """The cached values of ``keys``; the missing ones are loaded by one ``load`` call.

    A key another caller is loading right now is awaited, not loaded again: when a hot
    entry expires, the requests in flight wait for one query instead of each making its own
    (a burst of calls from one number would otherwise queue up behind 30 identical reads).
    """
    found: dict[K, V | None] = {}
    mine: list[K] = []
    waiting: list[tuple[K, asyncio.Future[V | None]]] = []
    for key in keys:
        hit, value = cache.get(key)
        if hit:
            found[key] = value
        elif (pending := cache.loading.get(key)) is not None:
            waiting.append((key, pending))
        else:
            mine.append(key)
    if mine:
        loop = asyncio.get_running_loop()
        futures: dict[K, asyncio.Future[V | None]] = {}
        for key in mine:
            future: asyncio.Future[V | None] = loop.create_future()
            future.add_done_callback(_retrieved)
            futures[key] = cache.loading[key] = future
        try:
            loaded = await load(mine)
        except BaseException as exc:
            failure = exc if isinstance(exc, Exception) else TransientError("lookup cancelled")
            for key, future in futures.items():
                cache.loading.pop(key, None)
                future.set_exception(failure)
            raise
        for key, future in futures.items():
            found[key] = loaded.get(key)
            cache.put(key, found[key])
            cache.loading.pop(key, None)
            future.set_result(found[key])
    for key, pending in waiting:
        found[key] = await asyncio.shield(pending)
    return found


def _retrieved(future: "asyncio.Future[Any]") -> None:
    """Mark a failure as seen: a load nobody else waited for must not warn at exit."""
    if not future.cancelled():
        future.exception()


class DirectoryCache:
    """The decider's directory reads: customer by identity, team, agent.

    Each answer (a miss too) is kept ``ttl`` seconds, so a customer, identity, team or agent
    changed in the database is seen at most ``ttl`` seconds later; ``ttl=0`` reads the
    database every time. Customer lookups of messages in flight together are answered by one
    query (``Batcher``). Routing state (last agent, presence, thread owners) is not kept here.
    """

    def __init__(
        self,
        sessions: async_sessionmaker[Any],
        ttl: float,
        *,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self._sessions = sessions
        self._customers: _Expiring[tuple[str, str], CustomerRecord | None] = _Expiring(
            ttl, max_entries, clock
        )
        self._teams: _Expiring[str, TeamRecord | None] = _Expiring(ttl, max_entries, clock)
        self._agents: _Expiring[str, AgentRecord | None] = _Expiring(ttl, max_entries, clock)
        self._customer_batch: Batcher[tuple[str, str], CustomerRecord | None] = Batcher(
            self._load_customers, None
        )

    async def _load_customers(
        self, keys: list[tuple[str, str]]
    ) -> dict[tuple[str, str], CustomerRecord | None]:
        async with self._sessions() as session:
            return dict(await customers_by_keys(session, keys))

    async def find_customer(self, identity: Identity, region: str) -> CustomerRecord | None:
        """``find_customer``: the first key (address, then aliases) that names a customer."""
        for key in lookup_keys(identity, region):
            hit, found = self._customers.get(key)
            if not hit:
                found = await self._customer_batch.get(key)
                self._customers.put(key, found)
            if found is not None:
                return found
        return None

    async def find_customers(
        self, session: "SessionSource", identities: list[Identity], region: str
    ) -> list[CustomerRecord | None]:
        """``find_customer`` for many senders: every key not cached is read by one query."""
        keyed = [lookup_keys(identity, region) for identity in identities]

        async def load(keys: list[tuple[str, str]]) -> dict[tuple[str, str], CustomerRecord]:
            return await customers_by_keys(await session(), keys)

        wanted = dict.fromkeys(key for keys in keyed for key in keys)
        known = await _many(self._customers, wanted, load)
        return [next((c for key in keys if (c := known[key]) is not None), None) for keys in keyed]

    async def get_agents(
        self, session: "SessionSource", agent_ids: set[str]
    ) -> dict[str, AgentRecord | None]:
        """``get_agent`` for many ids; the ones not cached are read by one query."""

        async def load(ids: list[str]) -> dict[str, AgentRecord]:
            return await agents_by_ids(await session(), ids)

        return await _many(self._agents, agent_ids, load)

    async def get_teams(
        self, session: "SessionSource", team_ids: set[str]
    ) -> dict[str, TeamRecord | None]:
        """``get_team`` for many ids; the ones not cached are read by one query."""

        async def load(ids: list[str]) -> dict[str, TeamRecord]:
            return await teams_by_ids(await session(), ids)

        return await _many(self._teams, team_ids, load)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        hit, team = self._teams.get(team_id)
        if not hit:
            async with self._sessions() as session:
                team = await get_team(session, team_id)
            self._teams.put(team_id, team)
        return team

    async def get_agent(self, agent_id: str) -> AgentRecord | None:
        hit, agent = self._agents.get(agent_id)
        if not hit:
            async with self._sessions() as session:
                agent = await get_agent(session, agent_id)
            self._agents.put(agent_id, agent)
        return agent

    def clear(self) -> None:
        """Forget everything (after an import or a reload): the next lookups read the database."""
        for part in (self._customers, self._teams, self._agents):
            part.clear()

    def __len__(self) -> int:
        return len(self._customers) + len(self._teams) + len(self._agents)
