"""Shared fixtures: a fresh RabbitMQ vhost per test, a fresh directory database (SQLite file
or a PostgreSQL database created for the test), and the opened bus on that vhost."""

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from routers.store.engine import create_engine
from tests.support import broker, directory

#: fixtures every test may ask for: the daemon as a process, the phone app (Twilio and PBX)
pytest_plugins = ["tests.daemon_fixtures", "tests.phone_fixtures"]

PG_DSN = os.environ.get("OMNIROUTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")


@pytest.fixture
def vhost() -> Iterator[str]:
    """A RabbitMQ vhost of the test's own, so queues never leak between tests."""
    with broker.fresh_vhost() as name:
        yield name


@pytest.fixture
def amqp_url(vhost: str) -> str:
    return broker.vhost_url(vhost)


@pytest.fixture
async def bus(amqp_url: str) -> AsyncIterator[Bus]:
    async with broker.opened_bus(amqp_url) as opened:
        yield opened


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/directory.db"


@contextlib.asynccontextmanager
async def _created_database() -> AsyncIterator[str]:
    """The URL of a PostgreSQL database created for the block and dropped after it."""
    name = f"omniroute_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(f"{PG_DSN}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield f"{PG_DSN}/{name}"
    finally:
        conn = await asyncpg.connect(f"{PG_DSN}/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A PostgreSQL database created for this test and dropped after it."""
    async with _created_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The directory on both backends: each test using it runs once per database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/directory.db"
        return
    async with _created_database() as url:
        yield url


@contextlib.asynccontextmanager
async def _migrated(url: str) -> AsyncIterator[AsyncEngine]:
    await directory.migrated(url)  # a new SQLite file: a copy of one migrated per process
    eng = create_engine(url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated directory, once on SQLite and once on PostgreSQL."""
    async with _migrated(database_url) as eng:
        yield eng


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated SQLite directory for tests that do not care about the backend."""
    async with _migrated(sqlite_url) as eng:
        yield eng
