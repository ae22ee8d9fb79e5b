"""The import's own database connection, spoken to through its driver.

Sole purpose: give the customers import (``routers.csv.staging``, ``routers.csv.merge``) the
few things it does on a connection, bulk loads, whole-file statements and transactions, at
the driver's speed: asyncpg's ``COPY`` and explicit per-statement timeouts (the engine's
``command_timeout`` bounds the router's small statements, not a merge of a million rows),
and sqlite3's ``executemany`` on aiosqlite's thread. SQL is written once for both; the few
spellings that differ are attributes here.
"""

import sqlite3
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

Records = list[tuple[Any, ...]]

#: the bound on one whole-file statement (a merge of millions of rows on a slow disk)
STATEMENT_TIMEOUT = 3600.0
#: SQLite's page cache for each of the file and the staging tables during an import
CACHE_MB = 64
#: PostgreSQL's memory for each sort or hash of the merge
WORK_MEM_MB = 64
#: what the drivers raise when the database fails a statement or the connection is lost
ERRORS: tuple[type[Exception], ...] = (
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    SQLAlchemyError,
    ConnectionError,
    TimeoutError,
)


class Link(Protocol):
    """A driver connection with what the import needs; statements return rows affected."""

    #: SQL's null-safe "differs" (``IS DISTINCT FROM``; SQLite before 3.39 spells it ``IS NOT``)
    distinct: str
    #: joins by nested loops only (SQLite): every lookup the merge makes needs an index
    loops: bool

    async def execute(self, sql: str) -> int: ...

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]: ...

    async def load(self, table: str, columns: Sequence[str], records: Records) -> None:
        """Append ``records`` to ``table`` as fast as the driver can."""

    async def tune(self) -> None:
        """Give the connection room for whole-file statements; ``untune`` gives it back."""

    async def untune(self) -> None: ...

    async def begin(self) -> None:
        """Start the merge's transaction (SQLite: taking the write lock now, so that reads
        made in it cannot go stale before its first write)."""

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...


class _Postgres:
    distinct = "IS DISTINCT FROM"
    loops = False

    def __init__(self, raw: Any) -> None:
        self.raw = raw  # asyncpg.Connection
        self.transaction: Any = None

    async def execute(self, sql: str) -> int:
        status: str = await self.raw.execute(sql, timeout=STATEMENT_TIMEOUT)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.raw.fetch(sql, timeout=STATEMENT_TIMEOUT)]

    async def load(self, table: str, columns: Sequence[str], records: Records) -> None:
        if records:
            await self.raw.copy_records_to_table(
                table, records=records, columns=list(columns), timeout=STATEMENT_TIMEOUT
            )

    async def tune(self) -> None:
        pass  # the server's memory: work_mem is set for the merge's transaction only

    async def untune(self) -> None:
        pass

    async def begin(self) -> None:
        self.transaction = self.raw.transaction()
        await self.transaction.start()
        # hash joins and sorts over the whole file in memory rather than in batches on disk
        await self.execute(f"SET LOCAL work_mem = '{WORK_MEM_MB}MB'")

    async def commit(self) -> None:
        transaction, self.transaction = self.transaction, None
        await transaction.commit()

    async def rollback(self) -> None:
        transaction, self.transaction = self.transaction, None
        if transaction is not None:
            await transaction.rollback()


class _Sqlite:
    distinct = "IS NOT"
    loops = True

    def __init__(self, raw: Any) -> None:
        self.raw = raw  # aiosqlite.Connection
        self.cache = -2000

    async def execute(self, sql: str) -> int:
        cursor = await self.raw.execute(sql)
        count: int = cursor.rowcount
        await cursor.close()
        return max(count, 0)

    async def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.raw.execute_fetchall(sql)]

    async def load(self, table: str, columns: Sequence[str], records: Records) -> None:
        marks = ", ".join("?" * len(columns))
        await self.raw.executemany(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})",  # noqa: S608  names are ours
            records,
        )

    async def tune(self) -> None:
        # SQLite's default page cache (2 MiB) makes every index insert of a million-row
        # merge a read from the OS; this is the import process's own memory
        ((self.cache,),) = await self.fetch("PRAGMA cache_size")
        for schema in ("main", "temp"):
            await self.execute(f"PRAGMA {schema}.cache_size = -{CACHE_MB * 1024}")

    async def untune(self) -> None:
        for schema in ("main", "temp"):
            await self.execute(f"PRAGMA {schema}.cache_size = {self.cache}")

    async def begin(self) -> None:
        if self.raw.in_transaction:  # sqlite3 began one for the staging inserts: temp only
            await self.execute("COMMIT")
        await self.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        await self.execute("COMMIT")

    async def rollback(self) -> None:
        if self.raw.in_transaction:
            await self.execute("ROLLBACK")


async def link(conn: AsyncConnection) -> Link:
    """The driver connection under ``conn`` (which stays checked out meanwhile)."""
    raw = (await conn.get_raw_connection()).driver_connection
    return _Postgres(raw) if conn.dialect.name == "postgresql" else _Sqlite(raw)
