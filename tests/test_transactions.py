"""The router's units of database work (``routers.store.transactions``): all or nothing, on
SQLite and PostgreSQL, off the event loop for SQLite, and still working after the directory
is reopened (a reload disposes the engine while the router runs) or the server dropped a
pooled connection."""

import asyncio
import sqlite3
import threading
import time
from urllib.parse import urlsplit

import pytest
from sqlalchemy import Connection, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.schema import Identity, InboundMessage, Route, RoutedMessage
from routers.models import RoutedRecord
from routers.settings import DirectorySettings
from routers.store import engine as store_engine
from routers.store import routed_log
from routers.store.engine import create_engine, migrate
from routers.store.transactions import transactions_of
from tests.support.net import TcpProxy


def _routed(external_id: str) -> RoutedMessage:
    message = InboundMessage(
        channel="sms",
        external_id=external_id,
        sender=Identity(kind="phone", address="+905321112233"),
        text="Modemim calismiyor",
    )
    return RoutedMessage(message=message, route=Route(kind="triage", reason="unknown_sender"))


def _recorded(connection: Connection) -> int:
    return int(connection.scalar(select(func.count()).select_from(RoutedRecord)) or 0)


async def test_a_unit_of_work_is_committed_whole_or_not_at_all(db: AsyncEngine) -> None:
    """A claim whose unit fails after writing leaves nothing behind, so the redelivered
    message claims again; a claim that commits keeps its channel id against a copy."""
    run = transactions_of(db)
    first, copy = _routed("SM1"), _routed("SM1")

    def claim_then_fail(connection: Connection) -> None:
        routed_log.claim_routed_many(connection, [first])
        raise RuntimeError("the batch failed after its insert")

    with pytest.raises(RuntimeError):
        await run(claim_then_fail)
    assert await run(_recorded) == 0

    assert await run(lambda c: routed_log.claim_routed_many(c, [first])) == [first.message.id]
    owners = await run(lambda c: routed_log.claim_routed_many(c, [copy, _routed("SM2")]))
    assert owners[0] == first.message.id, "the copy under another id loses the claim"
    assert await run(_recorded) == 2

    twins = [_routed("SM3"), _routed("SM3")]
    owners = await run(lambda c: routed_log.claim_routed_many(c, twins))
    assert owners == [twins[0].message.id] * 2, "within one batch, the first copy wins"
    assert await run(lambda c: routed_log.claim_routed_many(c, twins)) == owners, "a redelivery"
    assert await run(_recorded) == 3


async def test_sqlite_work_runs_on_a_thread_of_its_own(sqlite_url: str) -> None:
    """The point of ``Transactions``: a unit's statements leave the event loop once, together."""
    await migrate(sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        name = await transactions_of(engine)(lambda _c: threading.current_thread().name)
    finally:
        await engine.dispose()
    assert name != threading.current_thread().name
    assert name.startswith("omniroute-db")


async def test_transactions_work_on_after_the_directory_is_reopened(
    db: AsyncEngine,
) -> None:
    """A reload disposes the engine's pool while the router runs; claims go on."""
    run = transactions_of(db)
    await run(lambda c: routed_log.claim_routed_many(c, [_routed("SM1")]))
    before = run.engine.pool
    await db.dispose()
    assert run.engine.pool is not before, "reopened by the time dispose() returns"
    await run(lambda c: routed_log.claim_routed_many(c, [_routed("SM2")]))
    assert await run(_recorded) == 2
    assert await run.read(_recorded) == 2, "reads too"
    assert transactions_of(db) is run


async def test_a_locked_sqlite_directory_fails_a_unit_after_the_statement_timeout(
    sqlite_url: str,
) -> None:
    """``directory.statement_timeout`` bounds the wait for SQLite's write lock, so a stuck
    writer elsewhere makes a claim an outage (retried), not a hang."""
    await migrate(sqlite_url)
    engine = create_engine(sqlite_url, DirectorySettings(statement_timeout=0.3))
    run = transactions_of(engine)
    await run(_recorded)  # connected: the pragmas (WAL) are set
    holder = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        with pytest.raises(OperationalError, match="locked"):
            await run(lambda c: routed_log.claim_routed_many(c, [_routed("SM1")]))
        assert 0.25 < time.monotonic() - started < 3
    finally:
        holder.close()
        await engine.dispose()


def _two_clock_readings(connection: Connection) -> tuple[object, object]:
    """``now()`` (the start of the statement's transaction) in two statements apart."""
    first = connection.scalar(text("SELECT now()"))
    connection.execute(text("SELECT pg_sleep(0.02)"))
    return first, connection.scalar(text("SELECT now()"))


async def test_a_read_unit_runs_without_a_transaction_on_postgresql(pg_url: str) -> None:
    """Reads skip BEGIN and COMMIT (two round trips each): every statement is a transaction
    of its own, as READ COMMITTED sees it anyway; a unit that writes is still one whole."""
    await migrate(pg_url)
    engine = create_engine(pg_url)
    run = transactions_of(engine)
    try:
        first, second = await run.read(_two_clock_readings)
        assert first != second, "each statement of a read is its own transaction"
        first, second = await run(_two_clock_readings)
        assert first == second, "a unit of work is one transaction"
        await run(lambda c: routed_log.claim_routed_many(c, [_routed("SM1")]))
        assert await run.read(_recorded) == 1
    finally:
        await engine.dispose()


async def _kill_sessions_of(pg_url: str) -> int:
    """End every other session on the test's database, as a server restart would."""
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

    admin = await asyncpg.connect(pg_url)
    try:
        return len(
            await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await admin.close()


async def test_a_pooled_connection_the_server_dropped_is_replaced_before_use(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection the server ended (a restart) while it sat in the pool is replaced
    before a unit uses it, even one back in the pool a moment ago: asyncpg saw it closed,
    no round trip needed."""
    await migrate(pg_url)
    monkeypatch.setattr(store_engine, "PING_AFTER_IDLE", 3600)
    engine = create_engine(pg_url)
    run = transactions_of(engine)
    try:
        assert await run(_recorded) == 0
        assert await _kill_sessions_of(pg_url) == 1, "the pooled connection"
        await asyncio.sleep(0.1)  # asyncpg reads the server's goodbye
        assert await run(_recorded) == 0, "seen closed, replaced without a round trip"
        assert await run.read(_recorded) == 0
    finally:
        await engine.dispose()


async def test_a_connection_gone_silent_is_pinged_after_a_while_and_fails_once_in_use(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection that looks open but answers nothing (a firewall forgot the flow): after
    PING_AFTER_IDLE in the pool the ping times out and another connection serves the unit.
    In steady use nothing is pinged (three round trips through asyncpg): the unit fails as
    an outage within the statement timeout, and the next one works."""
    await migrate(pg_url)
    target = urlsplit(pg_url)
    proxy = TcpProxy("127.0.0.1", target.port or 5432)
    await proxy.start()
    proxied = pg_url.replace(f":{target.port}/", f":{proxy.port}/")
    engine = create_engine(proxied, DirectorySettings(statement_timeout=0.5))
    run = transactions_of(engine)
    try:
        monkeypatch.setattr(store_engine, "PING_AFTER_IDLE", 0.2)
        assert await run(_recorded) == 0
        await proxy.stall()
        await asyncio.sleep(0.3)  # idle past PING_AFTER_IDLE
        started = time.monotonic()
        assert await run(_recorded) == 0, "pinged, no answer, replaced"
        assert time.monotonic() - started < 3

        monkeypatch.setattr(store_engine, "PING_AFTER_IDLE", 3600)
        await proxy.stall()
        with pytest.raises(OperationalError):  # what callers retry as an outage
            await run(_recorded)
        assert await run(_recorded) == 0, "the silent connection was dropped after it failed"
    finally:
        await engine.dispose()
        await proxy.cut()
