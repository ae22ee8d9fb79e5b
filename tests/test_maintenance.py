"""The routing record stays bounded: old routed messages, reply markers and seen ids go,
thread owners stay (a customer may answer an old thread)."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.schema import Identity, InboundMessage, Route, RoutedMessage
from routers import state
from routers.models import AckSent, RoutedRecord, SeenId, ThreadOwner
from routers.settings import RoutingSettings
from routers.store import routed_log
from routers.store.connector_state import DbSeenStore
from routers.store.engine import sessionmaker
from routers.store.maintenance import Pruner

NOW = datetime(2026, 11, 23, tzinfo=UTC)


def routed(external_id: str, at: datetime) -> RoutedMessage:
    message = InboundMessage(
        channel="sms", external_id=external_id, sender=Identity(kind="phone", address="+1")
    )
    route = Route(kind="triage", reason="unknown_sender", decided_at=at)
    return RoutedMessage(message=message, route=route)


async def count(engine: AsyncEngine, table: type) -> int:
    async with sessionmaker(engine)() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


async def test_pruner_drops_old_records_and_keeps_thread_owners(engine: AsyncEngine) -> None:
    sessions = sessionmaker(engine)
    async with sessions.begin() as session:
        await routed_log.record_routed(session, routed("old", NOW - timedelta(days=91)))
        await routed_log.record_routed(session, routed("new", NOW - timedelta(days=1)))
        await state.record_reply(
            session,
            agent_id="ana",
            customer_id=None,
            channel="email",
            at=NOW - timedelta(days=400),
            message_id="<old@omni>",
        )
        # issue 16: a stranger acknowledged long ago is forgotten, a recent one is not
        session.add(AckSent(key="email:stranger@old.test", at=NOW - timedelta(days=91)))
        session.add(AckSent(key="customer:acme", at=NOW - timedelta(hours=1)))
    assert await DbSeenStore(engine).first_time("sms", "SM-recent")
    removed = await Pruner(
        engine, RoutingSettings(routed_log_days=90), clock=lambda: NOW
    ).prune_once()
    assert removed == 2
    assert await count(engine, AckSent) == 1
    assert await count(engine, RoutedRecord) == 1
    assert await count(engine, ThreadOwner) == 1
    assert await count(engine, SeenId) == 1
