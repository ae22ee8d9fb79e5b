"""Who is working, end to end (issue 15): two real ``omniroute run --component router
--component events`` processes share one PostgreSQL directory and a vhost, as two hosts
would. Messages go in at ``omniroute.inbound``, events at ``omniroute.events``, and what
comes out of ``omniroute.routed`` is checked: an agent at capacity is skipped and taken
again after answering (the load counted once across both processes), a message at a closed
hour goes to the after-hours team, an away agent's customer reaches the deputy."""

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.schema import AgentReplied, AgentStatus, Identity, InboundMessage, RoutedMessage
from ingest.topology import EVENTS, EVENTS_QUEUE, INBOUND, ROUTED_QUEUE, ROUTER_QUEUE
from routers.models import (
    Agent,
    AgentPresence,
    Assignment,
    Customer,
    CustomerIdentity,
    LastAgent,
    Team,
)
from routers.schedule import DAYS
from routers.store.engine import create_engine, migrate, sessionmaker
from tests.daemon_fixtures import ROOT, DaemonProcess, write_config
from tests.support.broker import take

ACME, GLOBEX, INITECH = "ayse@acme.test", "it@globex.test", "cfo@initech.test"


def _another_day() -> str:
    """A weekday three days from today in Istanbul: never today, whenever the test runs."""
    return DAYS[(datetime.now(ZoneInfo("Europe/Istanbul")).weekday() + 3) % 7]


async def _seed(engine: AsyncEngine) -> None:
    """Ana (email capacity 2) serves Acme; Globex's team works on another day than today
    and hands over to on call; Dora serves Initech, Bob can stand in for her."""
    async with sessionmaker(engine).begin() as session:
        session.add_all(
            [
                Team(id="billing", name="Billing", dial=None, email=None),
                Team(id="oncall", name="On call", dial=None, email=None),
                Team(
                    id="weekly",
                    name="Once a week",
                    dial=None,
                    email=None,
                    timezone="Europe/Istanbul",
                    hours=f"{_another_day()} 09:00-17:00",
                    after_hours="oncall",
                ),
            ]
        )
        await session.flush()
        session.add_all(
            [
                Agent(id="ana", name="Ana", team_id="billing", active=True, capacity="email=2"),
                Agent(id="bob", name="Bob", team_id="billing", active=True),
                Agent(id="dora", name="Dora", team_id="billing", active=True),
                Customer(id="acme", name="Acme", team_id="billing"),
                Customer(id="globex", name="Globex", team_id="weekly"),
                Customer(id="initech", name="Initech", team_id="billing"),
            ]
        )
        await session.flush()
        session.add_all(
            [
                CustomerIdentity(kind="email", address=ACME, customer_id="acme"),
                CustomerIdentity(kind="email", address=GLOBEX, customer_id="globex"),
                CustomerIdentity(kind="email", address=INITECH, customer_id="initech"),
            ]
        )


def email(sender: str, n: int) -> InboundMessage:
    return InboundMessage(
        channel="email",
        external_id=f"<{n}.{sender}@mail.test>",
        sender=Identity(kind="email", address=sender),
        subject="Fatura",
        text="Merhaba",
    )


@dataclass
class Pair:
    """Two router+events daemons on one vhost and one PostgreSQL directory."""

    bus: Bus
    engine: AsyncEngine
    logs: list[Path]
    _sent: int = 0

    async def send(self, *senders: str) -> list[InboundMessage]:
        """Publish one email per sender, all at once (a burst, as a ticket flood arrives)."""
        messages = []
        for sender in senders:
            self._sent += 1
            messages.append(email(sender, self._sent))
        await asyncio.gather(
            *(self.bus.publish(INBOUND, m.channel, m, message_id=m.id) for m in messages)
        )
        return messages

    async def event(
        self, event: AgentReplied | AgentStatus, done: Callable[[], Awaitable[bool]]
    ) -> None:
        """Publish an event; return once ``done`` says the directory shows it (bounded)."""
        self._sent += 1
        await self.bus.publish(EVENTS, event.type, event, message_id=f"ev-{self._sent}")
        async with asyncio.timeout(20):
            while not await done():
                await asyncio.sleep(0.05)

    async def routed(self, count: int, timeout: float = 30) -> list[tuple[str, RoutedMessage]]:
        """Exactly ``count`` messages off omniroute.routed (routing key, message): fails if
        fewer come within ``timeout``, or if one more comes within a second after."""
        taken = await take(self.bus, ROUTED_QUEUE, count, timeout, partial=True)
        if len(taken) == count:  # anything more within a second is a copy too many
            taken += await take(self.bus, ROUTED_QUEUE, 1, 1.0, partial=True)
        got = [(m.routing_key, m.model(RoutedMessage)) for m in taken]
        assert len(got) == count, [(key, r.route.reason) for key, r in got]
        return got

    async def open_load(self, agent_id: str) -> int:
        async with sessionmaker(self.engine)() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(Assignment)
                .where(Assignment.agent_id == agent_id, Assignment.closed_at.is_(None))
            )
        return int(count or 0)

    async def last_agent(self, customer_id: str) -> str | None:
        async with sessionmaker(self.engine)() as session:
            row = await session.get(LastAgent, customer_id)
        return row.agent_id if row else None

    async def presence(self, agent_id: str) -> str | None:
        async with sessionmaker(self.engine)() as session:
            row = await session.get(AgentPresence, agent_id)
        return row.status if row else None

    def routes_per_process(self) -> list[list[str]]:
        """The routes each process logged (``router.routed``), in its order."""
        return [
            [
                line["route"]
                for line in map(json.loads, log.read_text().splitlines())
                if line.get("event") == "router.routed"
            ]
            for log in self.logs
        ]


async def _wait_consumers(bus: Bus, queue: str, want: int) -> None:
    async with asyncio.timeout(60):
        while (await bus.queue_depth(queue))[1] < want:
            await asyncio.sleep(0.1)


@pytest.fixture
async def pair(tmp_path: Path, pg_url: str, amqp_url: str, bus: Bus) -> AsyncIterator[Pair]:
    await migrate(pg_url)
    engine = create_engine(pg_url)
    await _seed(engine)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    env["PYTHONPATH"] = str(ROOT)
    daemons, logs = [], []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name / "omniroute.toml", amqp_url, pg_url)
        daemons.append(DaemonProcess(config, env))
        logs.append(tmp_path / name / "daemon.log")
    try:
        for daemon, log in zip(daemons, logs, strict=True):
            daemon.start("router", "events", log=log)
        await _wait_consumers(bus, ROUTER_QUEUE, 2)
        await _wait_consumers(bus, EVENTS_QUEUE, 2)
        yield Pair(bus, engine, logs)
    finally:
        for daemon in daemons:
            daemon.stop_all()
        await engine.dispose()
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.mark.slow
async def test_capacity_is_counted_once_across_two_routers(pair: Pair) -> None:
    """Ana's email capacity is 2: of five emails from her customer, two reach her and three
    her team as last_agent_busy, however the two routers share them; once she answers, the
    next one is hers again."""

    async def ana_answered() -> bool:
        return await pair.last_agent("acme") == "ana"

    await pair.event(
        AgentReplied(agent_id="ana", customer_id="acme", channel="email"), ana_answered
    )

    sent = await pair.send(*[ACME] * 5)
    routed = await pair.routed(5)
    assert {r.message.id for _, r in routed} == {m.id for m in sent}
    per_process = pair.routes_per_process()
    assert all(per_process), f"both routers must take part for this to mean anything: {per_process}"
    to_ana = sum(key == "agent.ana" for key, _ in routed)
    assert to_ana == 2, (
        f"{to_ana} of 5 to Ana at capacity 2: load counted per process {per_process}"
    )
    keys = sorted((key, r.route.reason) for key, r in routed)
    assert keys == [("agent.ana", "last_agent")] * 2 + [("team.billing", "last_agent_busy")] * 3
    assert await pair.open_load("ana") == 2

    async def freed() -> bool:
        return await pair.open_load("ana") == 0

    await pair.event(AgentReplied(agent_id="ana", customer_id="acme", channel="email"), freed)
    await pair.send(ACME)
    ((key, again),) = await pair.routed(1)
    assert (key, again.route.reason) == ("agent.ana", "last_agent")


@pytest.mark.slow
async def test_closed_hour_goes_after_hours_and_away_agent_reaches_the_deputy(
    pair: Pair,
) -> None:
    """Globex's team works another day of the week: on call takes its email now. Dora is
    away for an hour with Bob as deputy: her customer's email reaches Bob, for Dora."""
    await pair.send(GLOBEX)
    ((key, routed),) = await pair.routed(1)
    assert (key, routed.route.reason) == ("team.oncall", "after_hours")
    assert any("team weekly closed" in step for step in routed.route.steps), routed.route.steps

    async def dora_answered() -> bool:
        return await pair.last_agent("initech") == "dora"

    async def dora_away() -> bool:
        return await pair.presence("dora") == "away"

    await pair.event(
        AgentReplied(agent_id="dora", customer_id="initech", channel="email"), dora_answered
    )
    until = datetime.now(UTC) + timedelta(hours=1)
    await pair.event(
        AgentStatus(agent_id="dora", status="away", until=until, deputy="bob"), dora_away
    )
    await pair.send(INITECH, INITECH)
    got = await pair.routed(2)
    assert [(key, r.route.reason, r.route.for_agent) for key, r in got] == [
        ("agent.bob", "deputy", "dora")
    ] * 2
    assert all(r.route.fallback_team == "billing" for _, r in got)
