"""Durable small stores on the directory database: poller cursors and channel ids seen.

They implement ``ingest.protocols.CursorStore`` and ``SeenStore`` for the connectors, which
receive them from ``config`` and never import this module.
"""

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ingest.errors import TransientError
from routers.db import sessionmaker
from routers.models import Cursor, SeenId
from routers.sql import insert_new, upsert

#: rows per statement in the batch methods: 3 bound values a row stays far below SQLite's
#: variable limit (32,766; 999 before 3.32)
_CHUNK = 300


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
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = sessionmaker(engine)

    async def first_time(self, channel: str, external_id: str) -> bool:
        try:
            async with self._sessions.begin() as session:
                return await insert_new(
                    session,
                    SeenId.__table__,  # type: ignore[arg-type]
                    {"channel": channel, "external_id": external_id, "at": datetime.now(UTC)},
                    ["channel", "external_id"],
                )
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc

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
        now = datetime.now(UTC)
        new: set[str] = set()
        try:
            async with self._sessions.begin() as session:
                for start in range(0, len(wanted), _CHUNK):
                    rows = [
                        {"channel": channel, "external_id": external_id, "at": now}
                        for external_id in wanted[start : start + _CHUNK]
                    ]
                    stmt = (
                        _insert(session)
                        .values(rows)
                        .on_conflict_do_nothing(index_elements=["channel", "external_id"])
                        .returning(SeenId.external_id)
                    )
                    new.update((await session.scalars(stmt)).all())
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
