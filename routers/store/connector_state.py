"""Durable small stores on the directory database: poller cursors and channel ids seen.

They implement ``ingest.protocols.CursorStore`` and ``SeenStore`` for the connectors, which
receive them from ``config`` and never import this module. Their writes run as plain
functions of a ``Connection`` (``routers.store.transactions``): on SQLite an ORM session
through aiosqlite cost about 13 ms per batch of 50 ids (a hand-off to its thread for every
cursor call), most of a mailbox batch's database time.
"""

import asyncio
import contextlib
import functools
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.errors import TransientError
from routers.models import Cursor, SeenId
from routers.store.engine import sessionmaker
from routers.store.sql import upsert_statement
from routers.store.transactions import transactions_of

#: rows per statement in the batch methods: 3 bound values a row stays far below SQLite's
#: variable limit (32,766; 999 before 3.32)
_CHUNK = 300

#: a first_time call waiting for the writer: channel, external id, its answer
_Claim = tuple[str, str, "asyncio.Future[bool]"]


_SEEN = cast(Table, SeenId.__table__)
_CURSORS = cast(Table, Cursor.__table__)


@functools.cache
def _cursor_upsert(dialect: str) -> Any:
    return upsert_statement(dialect, _CURSORS, ["key"], ["value", "updated_at"])


@functools.cache
def _seen_insert(dialect: str) -> Any:
    """``INSERT … ON CONFLICT DO NOTHING RETURNING external_id``: the ids it inserted."""
    stmt = upsert_statement(dialect, _SEEN, ["channel", "external_id"], [])
    return stmt.returning(_SEEN.c.external_id)


class DbCursorStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = sessionmaker(engine)
        self._run = transactions_of(engine)

    async def get(self, key: str) -> str | None:
        try:
            async with self._sessions() as session:
                value: str | None = await session.scalar(
                    select(Cursor.value).where(Cursor.key == key)
                )
                return value
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc

    async def set(self, key: str, value: str) -> None:
        row = {"key": key, "value": value, "updated_at": datetime.now(UTC)}

        def write(connection: Connection) -> None:
            connection.execute(_cursor_upsert(connection.dialect.name), row)

        try:
            await self._run(write)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc


class DbSeenStore:
    """Channel ids seen, in the ``seen`` table.

    ``first_time`` calls made while a write is under way are written together, in one
    transaction, by one task: at a few hundred webhooks a second, one transaction each
    queued on SQLite's single write lock (whose busy handler sleeps) and the webhooks fell
    behind for good. Each caller still learns whether its own id was new
    (``INSERT … ON CONFLICT DO NOTHING RETURNING``); the first of two callers with the
    same id in one batch gets True.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._run = transactions_of(engine)
        self._pending: list[_Claim] = []
        self._writer: asyncio.Task[None] | None = None

    async def first_time(self, channel: str, external_id: str) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((channel, external_id, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="seen-store")
        return await future

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:_CHUNK], self._pending[_CHUNK:]
            try:
                new = await self._record(batch)
            except SQLAlchemyError as exc:
                _fail(batch, TransientError(f"directory database: {exc}"))
                continue
            except BaseException:
                _fail([*batch, *self._pending], TransientError("seen store: cancelled"))
                self._pending = []
                raise
            abandoned: list[tuple[str, str]] = []
            for channel, external_id, future in batch:
                fresh = (channel, external_id) in new
                new.discard((channel, external_id))  # a second caller with it: not new
                if not future.done():
                    future.set_result(fresh)
                elif fresh:  # its caller gave up: unmark it, or its retry would be dropped
                    abandoned.append((channel, external_id))
            for channel in {c for c, _ in abandoned}:
                with contextlib.suppress(TransientError):
                    await self.forget_many(channel, [i for c, i in abandoned if c == channel])

    async def _record(self, batch: list[_Claim]) -> set[tuple[str, str]]:
        by_channel: dict[str, list[str]] = {}
        for channel, external_id, _ in batch:
            by_channel.setdefault(channel, []).append(external_id)

        def record(connection: Connection) -> set[tuple[str, str]]:
            new: set[tuple[str, str]] = set()
            for channel, ids in by_channel.items():
                inserted = _insert_new(connection, channel, list(dict.fromkeys(ids)))
                new.update((channel, external_id) for external_id in inserted)
            return new

        return await self._run(record)

    async def forget(self, channel: str, external_id: str) -> None:
        await self.forget_many(channel, [external_id])

    async def first_time_many(self, channel: str, external_ids: Iterable[str]) -> set[str]:
        """One transaction; ``INSERT … ON CONFLICT DO NOTHING RETURNING`` names exactly the
        rows this call inserted, so two callers racing on one id cannot both see it new."""
        wanted = list(dict.fromkeys(external_ids))
        if not wanted:
            return set()
        try:
            return await self._run(lambda connection: _insert_new(connection, channel, wanted))
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc

    async def forget_many(self, channel: str, external_ids: Iterable[str]) -> None:
        doomed = list(dict.fromkeys(external_ids))
        if not doomed:
            return

        def forget(connection: Connection) -> None:
            for start in range(0, len(doomed), _CHUNK):
                connection.execute(
                    delete(_SEEN).where(
                        _SEEN.c.channel == channel,
                        _SEEN.c.external_id.in_(doomed[start : start + _CHUNK]),
                    )
                )

        try:
            await self._run(forget)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc


def _insert_new(connection: Connection, channel: str, external_ids: list[str]) -> set[str]:
    """Insert the ids not recorded yet; the ones this statement inserted. The rows go as
    parameters of one statement (SQLAlchemy's "insertmanyvalues": compiled once and cached,
    where a multi-row VALUES was compiled anew for every batch, 2 ms of 50 ids)."""
    now = datetime.now(UTC)
    stmt = _seen_insert(connection.dialect.name)
    new: set[str] = set()
    for start in range(0, len(external_ids), _CHUNK):
        rows = [
            {"channel": channel, "external_id": external_id, "at": now}
            for external_id in external_ids[start : start + _CHUNK]
        ]
        new.update(connection.execute(stmt, rows).scalars().all())
    return new


def _fail(batch: list[_Claim], exc: Exception) -> None:
    for *_, future in batch:
        if not future.done():
            future.set_exception(exc)
