"""Portable upserts for SQLite and PostgreSQL (both speak ``ON CONFLICT``).

The rows of a batch go as the parameters of one statement (executemany) on the session's
connection: ``Session.execute`` adds ORM work per statement (compile state, result
processing) that cost as much as the query itself on SQLite. The router's own hot path
runs as plain functions of a ``Connection`` instead (``routers.store.transactions``).
"""

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Executable, Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession


def _insert(session: AsyncSession, table: Table) -> Any:
    return insert_for(dialect_of(session), table)


def dialect_of(session: AsyncSession) -> str:
    return session.bind.dialect.name if session.bind is not None else "sqlite"


def insert_for(dialect: str, table: Table) -> Any:
    """An ``INSERT`` of ``dialect`` (both have ``ON CONFLICT``, each its own construct)."""
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)


async def upsert(
    session: AsyncSession,
    table: Table,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    *,
    update: Sequence[str] | None = None,
    where: Any = None,
) -> int:
    """Insert rows; on a key conflict update ``update`` columns (all non-key ones by default),
    only where ``where`` holds (a condition on ``excluded``/the table). Returns the rows
    affected where the driver counts them for many rows (SQLite does), else 0.

    The rows go as parameters of one statement (executemany): compiled once and cached,
    where a multi-row VALUES would be compiled anew for every batch size."""
    if not rows:
        return 0
    columns = update if update is not None else [c for c in rows[0] if c not in keys]
    stmt = upsert_statement(dialect_of(session), table, keys, columns, where=where)
    return await execute_many(session, stmt, rows)


def upsert_statement(
    dialect: str, table: Table, keys: Sequence[str], columns: Sequence[str], *, where: Any = None
) -> Any:
    """``upsert``'s statement, for a plain ``Connection`` too: on a key conflict update
    ``columns`` (nothing to update: leave the row as it is)."""
    stmt = insert_for(dialect, table)
    if not columns:
        return stmt.on_conflict_do_nothing(index_elements=list(keys))
    return stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={c: stmt.excluded[c] for c in columns},
        where=where(stmt.excluded) if where is not None else None,
    )


async def execute_many(
    session: AsyncSession, stmt: Executable, rows: Sequence[dict[str, Any]]
) -> int:
    """Run ``stmt`` once per row (executemany); the rows affected where the driver counts
    them."""
    connection = await session.connection()
    result = await connection.execute(stmt, list(rows))
    return max(0, int(getattr(result, "rowcount", 0) or 0))


async def insert_new(
    session: AsyncSession, table: Table, row: dict[str, Any], keys: Sequence[str]
) -> bool:
    """Insert one row unless its key exists; True when it was new."""
    stmt = _insert(session, table).values(row).on_conflict_do_nothing(index_elements=list(keys))
    result = await session.execute(stmt)
    return bool(getattr(result, "rowcount", 0))
