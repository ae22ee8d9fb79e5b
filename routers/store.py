"""Durable small stores on the directory database: poller cursors and channel ids seen.

They implement ``ingest.protocols.CursorStore`` and ``SeenStore`` for the connectors, which
receive them from ``config`` and never import this module.
"""

from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.errors import TransientError
from routers.db import sessionmaker
from routers.models import Cursor, SeenId
from routers.sql import insert_new, upsert


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
    def __init__(self, engine: AsyncEngine, *, keep: timedelta = timedelta(days=30)) -> None:
        self._sessions = sessionmaker(engine)
        self._keep = keep

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

    async def prune(self) -> int:
        cutoff = datetime.now(UTC) - self._keep
        async with self._sessions.begin() as session:
            result = await session.execute(delete(SeenId).where(SeenId.at < cutoff))
            return int(getattr(result, "rowcount", 0) or 0)
