"""Read access to the customer directory: who is this sender, which team, which agent.

Every lookup is by primary key or unique index. Identities are normalised the same way
the importer stored them (``ingest.identities``), so any spelling of a number matches.
``DirectoryCache`` keeps answers (a miss too) for a few seconds: the directory changes by
import, not per message, and a changed directory is seen once the entries expire.
"""

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
from sqlalchemy import Connection, Select, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from ingest.errors import TransientError
from ingest.identities import InvalidIdentity, normalise
from ingest.schema import Identity
from routers.models import Agent, Customer, CustomerIdentity, Team
from routers.store.transactions import Transactions

log = structlog.get_logger("omniroute.directory")


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
    return {(r.kind, r.address): CustomerRecord(r.id, r.name, r.team_id) for r in rows}


@functools.cache
def _customers_of_kinds(kinds: int) -> Select[Any]:
    # one "kind = ? AND address IN (...)" per kind: SQLite scans the whole table for a
    # row-value "(kind, address) IN (VALUES ...)", but searches the key index for this
    identity, customer = CustomerIdentity.__table__.c, Customer.__table__.c
    return (
        select(identity.kind, identity.address, customer.id, customer.name, customer.team_id)
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
    return {r.id: AgentRecord(r.id, r.name, r.team_id, r.dial, bool(r.active)) for r in rows}


def teams_by_ids(connection: Connection, team_ids: list[str]) -> dict[str, TeamRecord]:
    rows = connection.execute(_TEAMS, {"ids": team_ids}).all()
    return {r.id: TeamRecord(r.id, r.name, r.dial, r.email) for r in rows}


_agent, _team = Agent.__table__.c, Team.__table__.c
_AGENTS = select(_agent.id, _agent.name, _agent.team_id, _agent.dial, _agent.active).where(
    _agent.id.in_(bindparam("ids", expanding=True))
)
_TEAMS = select(_team.id, _team.name, _team.dial, _team.email).where(
    _team.id.in_(bindparam("ids", expanding=True))
)

K = TypeVar("K")
V = TypeVar("V")


class _Expiring(Generic[K, V]):
    """A bounded map whose entries are fresh for ``ttl`` seconds and may be served stale
    for another ``ttl`` while one reader refreshes them; the oldest go first when full."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        # keys a caller is reading now -> that read's answer (every key it found)
        self.loading: dict[K, asyncio.Future[dict[K, Any]]] = {}

    def get(self, key: K) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return True, entry[1]
        return False, None

    def stale(self, key: K) -> tuple[bool, V | None]:
        """An entry past its ``ttl`` but within the grace period after it."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] + self._ttl > self._clock():
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
    keys: Collection[K],
    read: Callable[[list[K]], Awaitable[dict[K, V]]],
    spawn: Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"],
) -> dict[K, V | None]:
    """The cached values of ``keys``; the missing ones are read by one ``read`` call.

    Every read runs in a task of its own (``spawn``), so a caller that gives up (a PBX
    answer's deadline) does not fail the others waiting for the same keys. A key another
    caller is reading right now is awaited, not read again: when an entry expires, the
    requests in flight wait for one query instead of each making its own. A key just past
    its time is answered from the cache while one background read refreshes it, so a busy
    entry never makes a request wait for the database.
    """
    found: dict[K, V | None] = {}
    if not keys:
        return found
    waiting: dict[K, asyncio.Future[dict[K, V]]] = {}
    mine: list[K] = []
    stale: list[K] = []
    for key in keys:
        hit, value = cache.get(key)
        if hit:
            found[key] = value
            continue
        pending = cache.loading.get(key)
        old, value = cache.stale(key)
        if old:
            found[key] = value
            if pending is None:
                stale.append(key)
        elif pending is not None:
            waiting[key] = pending
        else:
            mine.append(key)
    if stale:
        spawn(_load(cache, stale, _reading(cache, stale), read, quiet=True))
    if mine:
        reading = _reading(cache, mine)
        waiting.update(dict.fromkeys(mine, reading))
        spawn(_load(cache, mine, reading, read))
    answers: dict[asyncio.Future[dict[K, V]], dict[K, V]] = {}
    for key, future in waiting.items():
        if future not in answers:
            answers[future] = await asyncio.shield(future)
        found[key] = answers[future].get(key)
    return found


def _reading(cache: "_Expiring[K, V | None]", keys: list[K]) -> "asyncio.Future[dict[K, V]]":
    """Mark ``keys`` as being read (before the read starts): later callers wait for it."""
    future: asyncio.Future[dict[K, V]] = asyncio.get_running_loop().create_future()
    future.add_done_callback(_retrieved)
    for key in keys:
        cache.loading[key] = future
    return future


async def _load(
    cache: "_Expiring[K, V | None]",
    keys: list[K],
    future: "asyncio.Future[dict[K, V]]",
    read: Callable[[list[K]], Awaitable[dict[K, V]]],
    *,
    quiet: bool = False,
) -> None:
    """Read ``keys`` into the cache and resolve ``future`` with what was found; the
    callers waiting get its error. ``quiet``: a background refresh, whose failure is only
    logged."""
    try:
        loaded = await read(keys)
    except BaseException as exc:
        failure = exc if isinstance(exc, Exception) else TransientError("lookup cancelled")
        for key in keys:
            cache.loading.pop(key, None)
        future.set_exception(failure)
        if quiet and isinstance(exc, Exception):
            log.warning("directory.refresh_failed", error=str(exc)[:300])
            return
        if isinstance(exc, Exception):
            return  # the waiting callers have it
        raise
    for key in keys:
        cache.put(key, loaded.get(key))
        cache.loading.pop(key, None)
    future.set_result(loaded)


def _retrieved(future: "asyncio.Future[Any]") -> None:
    """Mark a failure as seen: a load nobody else waited for must not warn at exit."""
    if not future.cancelled():
        future.exception()


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
        self._customers: _Expiring[tuple[str, str], CustomerRecord | None] = _Expiring(
            ttl, max_entries, clock
        )
        self._teams: _Expiring[str, TeamRecord | None] = _Expiring(ttl, max_entries, clock)
        self._agents: _Expiring[str, AgentRecord | None] = _Expiring(ttl, max_entries, clock)
        self._reads: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak refs

    async def find_customers(
        self, identities: list[Identity], region: str
    ) -> list[CustomerRecord | None]:
        """The customer of each sender (address first, then aliases); every key not cached
        is read by one query."""
        keyed = [lookup_keys(identity, region) for identity in identities]
        wanted = dict.fromkeys(key for keys in keyed for key in keys)
        known = await _many(self._customers, wanted, self._reader(customers_by_keys), self._spawn)
        return [next((c for key in keys if (c := known[key]) is not None), None) for keys in keyed]

    async def get_agents(self, agent_ids: set[str]) -> dict[str, AgentRecord | None]:
        """Agents by id; the ones not cached are read by one query."""
        return await _many(self._agents, agent_ids, self._reader(agents_by_ids), self._spawn)

    async def get_teams(self, team_ids: set[str]) -> dict[str, TeamRecord | None]:
        """Teams by id; the ones not cached are read by one query."""
        return await _many(self._teams, team_ids, self._reader(teams_by_ids), self._spawn)

    def _reader(
        self, query: Callable[[Connection, list[K]], dict[K, V]]
    ) -> Callable[[list[K]], Awaitable[dict[K, V]]]:
        """``query`` on a connection of its own: a read shared by several callers must not
        hold any one caller's connection while they wait."""

        async def read(keys: list[K]) -> dict[K, V]:
            return await self._run(lambda connection: query(connection, keys))

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
