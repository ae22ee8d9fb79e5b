"""Durable small stores on the directory database: poller cursors and channel ids seen.

They implement ``ingest.protocols.CursorStore`` and ``SeenStore`` for the connectors, which
receive them from ``config`` and never import this module.
"""

import asyncio
import contextlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ingest.errors import TransientError
from routers.models import Cursor, SeenId
from routers.store.engine import sessionmaker
from routers.store.sql import upsert

#: rows per statement in the batch methods: 3 bound values a row stays far below SQLite's
#: variable limit (32,766; 999 before 3.32)
_CHUNK = 300

#: a first_time call waiting for the writer: channel, external id, its answer
_Claim = tuple[str, str, "asyncio.Future[bool]"]


def _insert(session: AsyncSession) -> Any:
    """The dialect's ``INSERT`` on ``seen`` (both SQLite and PostgreSQL speak ``ON CONFLICT``
    and ``RETURNING``)."""
    dialect = session.bind.dialect.name if session.bind is not None else "sqlite"
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(SeenId)


class DbCursorStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = sessionmaker(engine)

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
        try:
            async with self._sessions.begin() as session:
                await upsert(
                    session,
                    Cursor.__table__,  # type: ignore[arg-type]
                    [{"key": key, "value": value, "updated_at": datetime.now(UTC)}],
                    ["key"],
                )
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
        self._sessions = sessionmaker(engine)
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
        new: set[tuple[str, str]] = set()
        async with self._sessions.begin() as session:
            for channel, ids in by_channel.items():
                inserted = await _insert_new(session, channel, list(dict.fromkeys(ids)))
                new.update((channel, external_id) for external_id in inserted)
        return new

    async def forget(self, channel: str, external_id: str) -> None:
        try:
            async with self._sessions.begin() as session:
                await session.execute(
                    delete(SeenId).where(
                        SeenId.channel == channel, SeenId.external_id == external_id
                    )
                )
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc

    async def first_time_many(self, channel: str, external_ids: Iterable[str]) -> set[str]:
        """One transaction; ``INSERT … ON CONFLICT DO NOTHING RETURNING`` names exactly the
        rows this call inserted, so two callers racing on one id cannot both see it new."""
        wanted = list(dict.fromkeys(external_ids))
        if not wanted:
            return set()
        try:
            async with self._sessions.begin() as session:
                new = await _insert_new(session, channel, wanted)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc
        return new

    async def forget_many(self, channel: str, external_ids: Iterable[str]) -> None:
        doomed = list(dict.fromkeys(external_ids))
        if not doomed:
            return
        try:
            async with self._sessions.begin() as session:
                for start in range(0, len(doomed), _CHUNK):
                    await session.execute(
                        delete(SeenId).where(
                            SeenId.channel == channel,
                            SeenId.external_id.in_(doomed[start : start + _CHUNK]),
                        )
                    )
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc


async def _insert_new(session: AsyncSession, channel: str, external_ids: list[str]) -> set[str]:
    """Insert the ids not recorded yet; the ones this statement inserted."""
    now = datetime.now(UTC)
    new: set[str] = set()
    for start in range(0, len(external_ids), _CHUNK):
        rows = [
            {"channel": channel, "external_id": external_id, "at": now}
            for external_id in external_ids[start : start + _CHUNK]
        ]
        stmt = (
            _insert(session)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["channel", "external_id"])
            .returning(SeenId.external_id)
        )
        new.update((await session.scalars(stmt)).all())
    return new


def _fail(batch: list[_Claim], exc: Exception) -> None:
    for *_, future in batch:
        if not future.done():
            future.set_exception(exc)
