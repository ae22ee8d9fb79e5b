"""The decider's directory cache and batched lookups: fast, never waiting on the database for
a busy entry, and never stale for longer than ``router.directory_cache_ttl`` plus one read."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.schema import Identity
from routers.directory import CustomerRecord, DirectoryCache
from routers.models import Customer, CustomerIdentity
from routers.store.engine import sessionmaker
from routers.store.transactions import transactions_of
from tests.seed import seed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _find(cache: DirectoryCache, identity: Identity) -> Any:
    (found,) = await cache.find_customers([identity], "TR")
    return found


@contextmanager
def _counting_selects(engine: AsyncEngine) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "identities" in statement:
            statements.append(statement)

    runs_on = transactions_of(engine).engine
    event.listen(runs_on, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(runs_on, "before_cursor_execute", count)


async def _add_newcomer(engine: AsyncEngine) -> None:
    async with sessionmaker(engine).begin() as session:
        session.add(Customer(id="initech", name="Initech", team_id="network"))
        await session.flush()
        session.add(
            CustomerIdentity(kind="email", address="new@initech.test", customer_id="initech")
        )


async def test_a_new_customer_is_seen_once_the_ttl_and_one_refresh_have_passed(
    engine: AsyncEngine,
) -> None:
    """A cached miss hides a customer imported later only until the TTL has passed and the
    background refresh it starts is done; past twice the TTL the read is made at once."""
    await seed(engine)
    clock = Clock()
    cache = DirectoryCache(transactions_of(engine), ttl=5.0, clock=clock)
    newcomer = Identity(kind="email", address="new@initech.test")
    assert await _find(cache, newcomer) is None
    await _add_newcomer(engine)
    clock.now += 4.9
    assert await _find(cache, newcomer) is None, "still within the TTL"
    clock.now += 0.2
    assert await _find(cache, newcomer) is None, "stale: answered, refresh started"
    await asyncio.gather(*cache._reads)  # noqa: SLF001
    found = await _find(cache, newcomer)
    assert found is not None
    assert found.id == "initech"

    other = DirectoryCache(transactions_of(engine), ttl=5.0, clock=clock)
    stranger = Identity(kind="email", address="x@y.test")
    assert await _find(other, stranger) is None
    async with sessionmaker(engine).begin() as session:
        session.add(CustomerIdentity(kind="email", address="x@y.test", customer_id="globex"))
    clock.now += 10.1
    found = await _find(other, stranger)
    assert found is not None, "past the grace period the read is made, not started"


async def test_ttl_zero_reads_the_database_every_time(engine: AsyncEngine) -> None:
    await seed(engine)
    cache = DirectoryCache(transactions_of(engine), ttl=0)
    assert await _find(cache, Identity(kind="email", address="x@y.test")) is None
    async with sessionmaker(engine).begin() as session:
        session.add(CustomerIdentity(kind="email", address="x@y.test", customer_id="globex"))
    found = await _find(cache, Identity(kind="email", address="x@y.test"))
    assert found is not None
    assert found.id == "globex"
    assert len(cache) == 0


async def test_a_batch_is_one_query_and_each_sender_gets_its_own_answer(
    engine: AsyncEngine,
) -> None:
    """One query for the whole batch answers each sender with its own customer, aliases
    included, and None for strangers."""
    await seed(engine)
    cache = DirectoryCache(transactions_of(engine), ttl=0)
    identities = [
        Identity(kind="email", address="AYSE@acme.test"),
        Identity(kind="phone", address="0532 111 22 33"),
        Identity(kind="email", address="it@globex.test"),
        Identity(kind="email", address="nobody@nowhere.test"),
        Identity(kind="twitter", address="@nobody", aliases=["@AcmeLtd"]),
    ]
    with _counting_selects(engine) as selects:
        found = await cache.find_customers(identities, "TR")
    assert [c.id if c else None for c in found] == ["acme", "acme", "globex", None, "acme"]
    assert len(selects) == 1


async def test_callers_missing_the_same_key_together_wait_for_one_query(
    engine: AsyncEngine,
) -> None:
    """When a busy entry is missing, the callers in flight do not each read it: a burst of
    calls from one number would otherwise queue behind as many identical queries."""
    await seed(engine)
    cache = DirectoryCache(transactions_of(engine), ttl=5.0)
    caller = Identity(kind="phone", address="0532 111 22 33")
    with _counting_selects(engine) as selects:
        found = await asyncio.gather(*(_find(cache, caller) for _ in range(30)))
    assert all(isinstance(c, CustomerRecord) and c.id == "acme" for c in found)
    assert len(selects) == 1


async def test_a_failed_read_fails_every_caller_waiting_for_it(engine: AsyncEngine) -> None:
    """The callers waiting on one read get its error (a directory outage is then a
    TransientError for each of them), and the key is read again by the next caller."""
    await seed(engine)
    async with engine.begin() as connection:  # a real failure: the table is gone
        await connection.exec_driver_sql("ALTER TABLE identities RENAME TO identities_away")
    cache = DirectoryCache(transactions_of(engine), ttl=5.0)
    caller = Identity(kind="phone", address="0532 111 22 33")
    results = await asyncio.gather(
        *(cache.find_customers([caller], "TR") for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, OperationalError) for r in results), results
    async with engine.begin() as connection:
        await connection.exec_driver_sql("ALTER TABLE identities_away RENAME TO identities")
    found = await _find(cache, caller)
    assert found is not None
    assert found.id == "acme"


async def test_a_caller_giving_up_does_not_fail_the_others(engine: AsyncEngine) -> None:
    """A PBX answer's deadline cancels its own wait, not the read other callers share."""
    await seed(engine)
    cache = DirectoryCache(transactions_of(engine), ttl=5.0)
    caller = Identity(kind="phone", address="0532 111 22 33")
    impatient = asyncio.create_task(cache.find_customers([caller], "TR"))
    patient = asyncio.create_task(cache.find_customers([caller], "TR"))
    await asyncio.sleep(0)
    impatient.cancel()
    (found,) = await patient
    assert found is not None
    assert found.id == "acme"


async def test_an_outage_of_background_refreshes_is_one_warning(engine: AsyncEngine) -> None:
    """Stale entries keep answering while their refreshes fail: the log says so once, and
    once again when a refresh succeeds (not once per refresh: issue 19's db_proxy run)."""
    await seed(engine)
    clock = Clock()
    cache = DirectoryCache(transactions_of(engine), ttl=5.0, clock=clock)
    caller = Identity(kind="phone", address="0532 111 22 33")
    assert await _find(cache, caller) is not None
    async with engine.begin() as connection:
        await connection.exec_driver_sql("ALTER TABLE identities RENAME TO identities_away")
    clock.now += 6  # stale (within 2 ttl): answered from the cache, refreshed meanwhile
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert await _find(cache, caller) is not None
            await asyncio.sleep(0.05)  # the background refresh fails
        async with engine.begin() as connection:
            await connection.exec_driver_sql("ALTER TABLE identities_away RENAME TO identities")
        for _ in range(2):
            clock.now += 6
            assert await _find(cache, caller) is not None
            await asyncio.sleep(0.05)
    said = [e["event"] for e in logs if e["event"].startswith("directory.refresh")]
    assert said == ["directory.refresh_failed", "directory.refresh_recovered"]
