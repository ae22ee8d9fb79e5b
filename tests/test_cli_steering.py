"""Steering from the command line (issue 17): `omniroute customer show|unstick` and
`omniroute directory search|delete`, run as an operator runs them. `unstick` publishes the
same `customer.unstick` event a ticket system would, confirmed by the real broker, and the
events worker applying it sends the customer's next message to their team."""

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import aio_pika
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.health import Health
from ingest.schema import AgentReplied, CustomerUnstick, Identity, InboundMessage, schema_name
from ingest.topology import EVENTS
from routers.decider import DirectoryDecider
from routers.events import EventsWorker
from routers.models import CustomerIdentity, LastAgent
from routers.settings import RouterSettings, RoutingSettings
from routers.store.engine import create_engine
from tests.daemon_fixtures import DaemonProcess
from tests.support import directory

ISTANBUL = timezone(timedelta(hours=3))


@pytest.fixture
async def engine(daemon: DaemonProcess, sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """The daemon's directory with the example teams, agents, customers and holidays."""
    await asyncio.to_thread(directory.load_examples, daemon.config)
    opened = create_engine(sqlite_url)
    yield opened
    await opened.dispose()


async def last_agents(engine: AsyncEngine, customer_id: str) -> list[str]:
    async with engine.connect() as conn:
        found = await conn.scalars(
            select(LastAgent.agent_id).where(LastAgent.customer_id == customer_id)
        )
        return list(found)


def office_hours() -> datetime:
    """A coming Tuesday to Thursday, 11:00 in Istanbul: billing is open, no holiday."""
    day = datetime.now(ISTANBUL).date() + timedelta(days=1)
    while day.weekday() not in (1, 2, 3):
        day += timedelta(days=1)
    return datetime(day.year, day.month, day.day, 11, tzinfo=ISTANBUL)


async def test_customer_unstick_publishes_the_event_and_the_next_message_goes_to_the_team(
    daemon: DaemonProcess, bus: Bus, engine: AsyncEngine
) -> None:
    """The one path: the command's event is what a ticket system would publish, and the
    events worker forgets the last agent, so the decision is the customer's team again."""
    routing = RoutingSettings(default_region="TR")
    events = EventsWorker(
        bus=bus, engine=engine, routing=routing, settings=RouterSettings(), health=Health()
    )
    channel = await bus.connection.channel()
    seen = await channel.declare_queue(exclusive=True)  # a copy of what the CLI publishes
    await seen.bind(EVENTS, "customer.unstick")
    stop = asyncio.Event()
    task = asyncio.create_task(events.run(stop))
    try:
        await events.idle()
        replied = AgentReplied(agent_id="kerem", customer_id="c-1001", channel="email")
        await bus.publish(EVENTS, replied.type, replied, message_id="ev-replied")
        await events.idle()
        assert await last_agents(engine, "c-1001") == ["kerem"]
        decide = DirectoryDecider(engine, routing, clock=office_hours)
        email = Identity(kind="email", address="kemal.ozturk@example.com.tr")
        message = InboundMessage(channel="email", external_id="<1@x>", sender=email, text="?")
        assert (await decide(message)).route.routing_key == "agent.kerem"

        shown = await asyncio.to_thread(daemon.cli, "customer", "show", "c-1001")
        assert shown.returncode == 0, shown.stderr
        assert "last agent:       kerem (on email, " in shown.stdout
        assert "team:             billing" in shown.stdout
        assert "k***@example.com.tr" in shown.stdout
        assert "kemal.ozturk" not in shown.stdout  # redacted unless --show-identities

        result = await asyncio.to_thread(
            daemon.cli, "customer", "unstick", "c-1001", "--reason", "moved to billing desk"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("published customer.unstick: c-1001 (last agent kerem")
        await events.idle()
        assert await last_agents(engine, "c-1001") == []
        decision = await decide(message.model_copy(update={"external_id": "<2@x>"}))
        assert (decision.route.routing_key, decision.route.reason) == (
            "team.billing",
            "dedicated_team",
        )

        published = await seen.get(timeout=5)
        await published.ack()
        event = CustomerUnstick.model_validate_json(published.body)
        assert (event.customer_id, event.reason) == ("c-1001", "moved to billing desk")
        assert published.routing_key == "customer.unstick"
        assert published.type == schema_name(event) == "omniroute.event.customer.unstick.v1"
        assert published.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert published.message_id

        unknown, full = await asyncio.to_thread(
            daemon.cli_all,  # independent: the one publishes nothing, the other only reads
            ("customer", "unstick", "ghost"),
            ("customer", "show", "--identity", "0532 111 22 33", "--show-identities"),
        )
        assert (unknown.returncode, unknown.stderr, unknown.stdout) == (
            1,
            "omniroute: no customer 'ghost' in the directory\n",
            "",
        )
        assert await seen.get(fail=False, timeout=5) is None  # nothing published

        assert full.returncode == 0, full.stderr
        assert "customer:         c-1001" in full.stdout
        assert "last agent:       none" in full.stdout
        assert "email kemal.ozturk@example.com.tr" in full.stdout
        audit = [json.loads(ln) for ln in full.stderr.splitlines()]
        assert [(a["event"], a["customer"]) for a in audit] == [
            ("customer.identities_shown", "c-1001")
        ]  # the audit line, with the user who asked, on stderr: stdout is the record alone
        assert "identities_shown" not in full.stdout
    finally:
        stop.set()
        await task
        await channel.close()


async def test_directory_search_finds_names_turkish_aware_and_identities_unprinted(
    daemon: DaemonProcess, engine: AsyncEngine
) -> None:
    """`yilmaz` finds Ayşe Yılmaz, a national phone number finds its customer without
    printing it, and the output is bounded."""
    turkish, phone, bounded = await asyncio.to_thread(
        daemon.cli_all,
        ("directory", "search", "YILMAZ"),
        ("directory", "search", "0532 222 33 44"),
        ("directory", "search", "e", "--limit", "2"),
    )
    assert turkish.returncode == 0, turkish.stderr
    assert turkish.stdout.split() == ["agent", "ayse", "Ayşe", "Yılmaz", "billing", "name"]
    assert phone.returncode == 0, phone.stderr
    assert phone.stdout.split() == [
        "customer",
        "c-1002",
        "Fatma",
        "Arslan",
        "billing",
        "phone",
        "identity",
    ]
    assert bounded.returncode == 0, bounded.stderr
    lines = bounded.stdout.splitlines()
    assert len(lines) == 3
    assert lines[-1] == "(more not shown: raise --limit above 2)"


async def test_directory_delete_refuses_what_is_referred_to_and_cascades_a_customer(
    daemon: DaemonProcess, engine: AsyncEngine
) -> None:
    """A team with agents, or an agent who is a deputy and an escalation target, stays (one
    line naming why); a customer goes with their identities and last agent."""
    async with engine.begin() as conn:
        await conn.execute(
            LastAgent.__table__.insert().values(
                customer_id="c-1003", agent_id="elif", channel="email", at=datetime.now(UTC)
            )
        )
    team, agent, dry = await asyncio.to_thread(
        daemon.cli_all,  # two refusals and a dry run: none changes anything, so at once
        ("directory", "delete", "team", "supervisors"),
        ("directory", "delete", "agent", "zeynep"),
        ("directory", "delete", "customer", "c-1003", "--dry-run"),
    )
    assert (team.returncode, team.stdout) == (1, "")
    assert team.stderr == (
        "omniroute: team 'supervisors' is still referred to by team billing's escalate_to, "
        "team oncall's escalate_to: change those first\n"
    )
    assert agent.returncode == 1
    assert agent.stderr == (
        "omniroute: agent 'zeynep' is still referred to by agent john (deputy), "
        "team network's escalate_to: change those first\n"
    )
    assert (dry.returncode, dry.stdout) == (
        0,
        "would delete customer c-1003 with identities (5), last agent (1)\n",
    )
    done = await asyncio.to_thread(daemon.cli, "directory", "delete", "customer", "c-1003")
    assert (done.returncode, done.stdout) == (
        0,
        "deleted customer c-1003 with identities (5), last agent (1)\n",
    )
    async with engine.connect() as conn:
        left = await conn.scalar(
            select(func.count()).where(CustomerIdentity.customer_id == "c-1003")
        )
    assert left == 0
    assert await last_agents(engine, "c-1003") == []
