"""Issue 16, durable escalation timers: each overdue message escalates once however many
instances run the worker. The waits are written straight into the directory, already due;
two real escalation workers (on one PostgreSQL database, or on one SQLite file while a third
writer holds the lock) fire them onto the real broker, where every AMQP ``message_id``
``<id>#2`` (the escalated route) and ``sla:<id>:1`` (the event) is counted."""

import asyncio
import sqlite3
from datetime import timedelta

from sqlalchemy import insert, select, update

from ingest.schema import Identity, InboundMessage, utcnow
from ingest.topology import EVENTS, ROUTED_QUEUE
from routers.escalations import EscalationTimers
from routers.models import RoutedRecord, Team, Waiting
from routers.store.engine import create_engine
from tests.seed import seeded
from tests.support.broker import opened_bus, take, tally
from tests.support.timers import instance

SLA_QUEUE = "test.sla.durable"


async def due_waits(url: str, n: int) -> list[str]:
    """``n`` Acme mails routed to billing an hour ago, first answer due ten minutes ago;
    billing escalates to network. Their ids."""
    routed_at = utcnow() - timedelta(hours=1)
    records, waits = [], []
    for i in range(n):
        message = InboundMessage(
            channel="email",
            external_id=f"<wait-{i}@timers.test>",
            sender=Identity(kind="email", address="ayse@acme.test"),
            text="Faturam nerede?",
        )
        records.append(
            {
                "id": message.id,
                "channel": "email",
                "external_id": message.external_id,
                "thread_message_id": None,
                "customer_id": "acme",
                "route_kind": "team",
                "route_target": "billing",
                "reason": "dedicated_team",
                "routed_at": routed_at,
                "message": message.model_dump_json(),
            }
        )
        waits.append(
            {
                "message_id": message.id,
                "customer_id": "acme",
                "team_id": "billing",
                "channel": "email",
                "received_at": routed_at,
                "due_at": routed_at + timedelta(minutes=50),
                "level": 0,
                "answered_at": None,
                "message": message.model_dump_json(),
            }
        )
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(Team).where(Team.id == "billing").values(escalate_to="network")
            )
            await connection.execute(insert(RoutedRecord), records)
            await connection.execute(insert(Waiting), waits)
    finally:
        await engine.dispose()
    return [str(r["id"]) for r in records]


async def levels(url: str) -> dict[str, int]:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(select(Waiting.message_id, Waiting.level))
            return {r.message_id: r.level for r in rows}
    finally:
        await engine.dispose()


async def published(amqp_url: str, ids: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Copies of each escalated route and each sla.breached, everything counted."""
    async with opened_bus(amqp_url, name="reader") as reader:
        routes = await tally(reader, ROUTED_QUEUE, {f"{i}#2" for i in ids}, timeout=30)
        events = await tally(reader, SLA_QUEUE, {f"sla:{i}:1" for i in ids}, timeout=30)
        for queue, counts in ((ROUTED_QUEUE, routes), (SLA_QUEUE, events)):
            for got in await take(reader, queue, quiet=0):
                counts[got.message_id or ""] = counts.get(got.message_id or "", 0) + 1
    return routes, events


async def sla_queue(amqp_url: str) -> None:
    async with opened_bus(amqp_url, name="binder") as bus, bus.connection.channel() as channel:
        queue = await channel.declare_queue(SLA_QUEUE, durable=True)
        await queue.bind(EVENTS, "sla.breached")


async def test_two_instances_on_postgresql_escalate_each_message_once(
    pg_url: str, amqp_url: str
) -> None:
    await seeded(pg_url)
    await sla_queue(amqp_url)
    ids = await due_waits(pg_url, 600)
    async with (
        instance(EscalationTimers, pg_url, amqp_url, "a") as a,
        instance(EscalationTimers, pg_url, amqp_url, "b") as b,
    ):
        taken = await asyncio.gather(a.drain(), b.drain())
        fired = (a.fired, b.fired)
    routes, events = await published(amqp_url, ids)
    print(f"waits=600 taken={taken} fired={fired}")
    assert all(fired), f"both instances must have fired some for this to mean anything: {fired}"
    assert sum(taken) == sum(fired) == 600
    assert routes == {f"{i}#2": 1 for i in ids}
    assert events == {f"sla:{i}:1": 1 for i in ids}
    assert set((await levels(pg_url)).values()) == {1}


async def test_two_workers_on_one_sqlite_file_escalate_each_message_once(
    amqp_url: str, sqlite_url: str
) -> None:
    """As tests/test_timers_durable.py does for offers: both workers wait on a third
    writer's lock with due rows; the take writes first, so it reads under the lock."""
    await seeded(sqlite_url)
    await sla_queue(amqp_url)
    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        async with (
            instance(EscalationTimers, sqlite_url, amqp_url, "a") as a,
            instance(EscalationTimers, sqlite_url, amqp_url, "b") as b,
        ):
            assert not any(await asyncio.gather(a.drain(), b.drain()))  # connections open
            ids = await due_waits(sqlite_url, 100)
            blocker.execute("BEGIN IMMEDIATE")
            drains = asyncio.gather(a.drain(), b.drain())
            await asyncio.sleep(1)  # both wait to write
            blocker.execute("COMMIT")
            taken = await drains
    finally:
        blocker.close()
    routes, events = await published(amqp_url, ids)
    print(f"waits=100 taken={taken}")
    assert routes == {f"{i}#2": 1 for i in ids}
    assert events == {f"sla:{i}:1": 1 for i in ids}
