"""One instance's timer worker for the durability tests (offers and escalations alike): its
own engine, bus (on the shared vhost) and decider, as a separate process would have; and
offers already due, written straight into the directory (the tests and
bench/faults/instances.py)."""

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from typing import TypeVar

from sqlalchemy import insert

from ingest.health import Health
from ingest.schema import Identity, InboundMessage, utcnow
from routers.decider import DirectoryDecider
from routers.models import Assignment, RoutedRecord
from routers.settings import RoutingSettings
from routers.store.engine import create_engine
from routers.timers import TimerWorker
from tests.support.broker import opened_bus

W = TypeVar("W", bound=TimerWorker)


@contextlib.asynccontextmanager
async def instance(kind: type[W], db_url: str, amqp_url: str, name: str) -> AsyncIterator[W]:
    routing = RoutingSettings(default_region="TR")
    engine = create_engine(db_url)
    try:
        async with opened_bus(amqp_url, name=name) as bus:
            yield kind(
                bus=bus,
                engine=engine,
                decider=DirectoryDecider(engine, routing),
                routing=routing,
                health=Health(),
            )
    finally:
        await engine.dispose()


async def write_due_offers(
    url: str, n: int, offered: Sequence[tuple[str, str, str]], domain: str
) -> list[InboundMessage]:
    """Write ``n`` offers due a minute ago straight into the directory at ``url``: the
    routed record and the agent's assignment of each, as ``claim_routed_many`` writes them,
    in two executemany statements. ``offered`` cycles (sender, customer, agent); channel ids
    are ``<offer-i@domain>``. Returns the messages offered."""
    offered_at = utcnow() - timedelta(minutes=10)
    messages, records, assignments = [], [], []
    for i in range(n):
        address, customer, agent = offered[i % len(offered)]
        message = InboundMessage(
            channel="email",
            external_id=f"<offer-{i}@{domain}>",
            sender=Identity(kind="email", address=address),
            text="Faturam nerede?",
        )
        body = message.model_dump_json()  # the whole message, kept with the offer
        messages.append(message)
        records.append(
            {
                "id": message.id,
                "channel": "email",
                "external_id": message.external_id,
                "thread_message_id": None,
                "customer_id": customer,
                "route_kind": "agent",
                "route_target": agent,
                "reason": "last_agent",
                "routed_at": offered_at,
                "message": body,
            }
        )
        assignments.append(
            {
                "message_id": message.id,
                "agent_id": agent,
                "customer_id": customer,
                "channel": "email",
                "assigned_at": offered_at,
                "closed_at": None,
                "offer_due_at": offered_at + timedelta(minutes=9),
                "accepted_at": None,
                "outcome": None,
                "attempt": 1,
                "message": body,
            }
        )
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(RoutedRecord), records)
            await connection.execute(insert(Assignment), assignments)
    finally:
        await engine.dispose()
    return messages
