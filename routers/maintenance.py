"""Keeps the routing record bounded: prunes routed messages, sent-reply markers and seen
channel ids older than ``routing.routed_log_days``, at start and then every hour."""

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.schema import utcnow
from routers import state
from routers.db import sessionmaker
from routers.settings import RoutingSettings

log = structlog.get_logger("omniroute.maintenance")


class Pruner:
    name = "pruner"

    def __init__(
        self,
        engine: AsyncEngine,
        routing: RoutingSettings,
        *,
        interval: float = 3600.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessionmaker(engine)
        self.routing = routing
        self._interval = interval
        self._clock = clock

    async def prune_once(self) -> int:
        keep = timedelta(days=self.routing.routed_log_days)
        async with self._sessions.begin() as session:
            removed = await state.prune(session, self._clock(), keep)
        if removed:
            log.info("maintenance.pruned", rows=removed, older_than_days=keep.days)
        return removed

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.prune_once()
            except SQLAlchemyError as exc:  # retried at the next interval
                log.warning("maintenance.prune_failed", error=str(exc))
            try:
                async with asyncio.timeout(self._interval):
                    await stop.wait()
            except TimeoutError:
                pass
