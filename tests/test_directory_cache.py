"""The decider's directory cache and batched lookups: fast, and never stale for longer than
``router.directory_cache_ttl``."""

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.schema import Identity
from routers.db import sessionmaker
from routers.directory import DirectoryCache
from routers.models import Customer, CustomerIdentity
from tests.seed import seed


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_new_customer_is_seen_once_the_ttl_has_passed(engine: AsyncEngine) -> None:
    """A cached miss must not hide a customer imported later for longer than the TTL."""
    await seed(engine)
    clock = Clock()
    cache = DirectoryCache(sessionmaker(engine), ttl=5.0, clock=clock)
    newcomer = Identity(kind="email", address="new@initech.test")
    assert await cache.find_customer(newcomer, "TR") is None
    async with sessionmaker(engine).begin() as session:
        session.add(Customer(id="initech", name="Initech", team_id="network"))
        await session.flush()
        session.add(
            CustomerIdentity(kind="email", address="new@initech.test", customer_id="initech")
        )
    clock.now += 4.9
    assert await cache.find_customer(newcomer, "TR") is None, "still within the TTL"
    clock.now += 0.2
    found = await cache.find_customer(newcomer, "TR")
    assert found is not None
    assert found.id == "initech"


async def test_ttl_zero_reads_the_database_every_time(engine: AsyncEngine) -> None:
    await seed(engine)
    cache = DirectoryCache(sessionmaker(engine), ttl=0)
    assert await cache.find_customer(Identity(kind="email", address="x@y.test"), "TR") is None
    async with sessionmaker(engine).begin() as session:
        session.add(CustomerIdentity(kind="email", address="x@y.test", customer_id="globex"))
    found = await cache.find_customer(Identity(kind="email", address="x@y.test"), "TR")
    assert found is not None
    assert found.id == "globex"
    assert len(cache) == 0


async def test_lookups_in_flight_together_each_get_their_own_answer(engine: AsyncEngine) -> None:
    """Batched lookups (one query for many keys) answer each caller with its own customer,
    aliases included, and None for strangers."""
    await seed(engine)
    cache = DirectoryCache(sessionmaker(engine), ttl=0)
    identities = [
        Identity(kind="email", address="AYSE@acme.test"),
        Identity(kind="phone", address="0532 111 22 33"),
        Identity(kind="email", address="it@globex.test"),
        Identity(kind="email", address="nobody@nowhere.test"),
        Identity(kind="twitter", address="@nobody", aliases=["@AcmeLtd"]),
    ]
    found = await asyncio.gather(*(cache.find_customer(i, "TR") for i in identities))
    assert [c.id if c else None for c in found] == ["acme", "acme", "globex", None, "acme"]
