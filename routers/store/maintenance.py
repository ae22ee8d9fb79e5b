"""Keeps the routing record bounded: prunes routed messages, assignments, first-answer waits,
sent-reply markers and seen channel ids older than ``routing.routed_log_days``, at start
and then every hour."""

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy import delete
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ingest.schema import utcnow
from routers.models import (
    AckSent,
    Assignment,
    RoutedRecord,
    SeenId,
    SentReply,
    ShadowDiff,
    Waiting,
)
from routers.settings import RoutingSettings
from routers.store.engine import sessionmaker

log = structlog.get_logger("omniroute.maintenance")


async def prune(session: AsyncSession, now: datetime, keep: timedelta) -> int:
    """Drop routed records, sent-reply markers and seen channel ids older than ``keep``;
    returns the rows removed. Thread owners are kept: a customer may answer a year later."""
    cutoff = now - keep
    removed = 0
    for stmt in (
        delete(RoutedRecord).where(RoutedRecord.routed_at < cutoff),
        delete(Assignment).where(Assignment.assigned_at < cutoff),
        # issue 16: a wait holds the whole message; without its routed record it can never
        # escalate again (routers.escalations), answered or not
        delete(Waiting).where(Waiting.received_at < cutoff),
        delete(SentReply).where(SentReply.at < cutoff),
        delete(SeenId).where(SeenId.at < cutoff),
        delete(ShadowDiff).where(ShadowDiff.at < cutoff),
        # an acknowledgement older than that allows the next one anyway (ack.quiet_for is
        # far shorter): without this, every stranger's address stayed for ever
        delete(AckSent).where(AckSent.at < cutoff),
    ):
        result = await session.execute(stmt)
        removed += int(getattr(result, "rowcount", 0) or 0)
    return removed


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
            removed = await prune(session, self._clock(), keep)
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
