"""`omniroute agent status` as a supervisor runs it (issue 15): the same `agent.status` event
a ticket system publishes, confirmed by the real broker, checked against the directory
first, and a time without its offset refused in one line."""

import asyncio
from datetime import UTC, datetime

import aio_pika
import pytest

from ingest.bus import Bus
from ingest.schema import AgentStatus, schema_name
from ingest.topology import EVENTS_QUEUE
from tests.daemon_fixtures import DaemonProcess
from tests.support import directory


def load_examples(daemon: DaemonProcess) -> None:
    directory.load_examples(daemon.config, ("teams", "agents"))


async def events(bus: Bus) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Everything on the events queue now (the events worker is not running)."""
    channel = await bus.connection.channel()
    try:
        queue = await channel.get_queue(EVENTS_QUEUE)
        found = []
        while (message := await queue.get(fail=False, timeout=5)) is not None:
            await message.ack()
            found.append(message)
        return found
    finally:
        await channel.close()


async def test_agent_status_publishes_the_event_with_until_and_deputy(
    daemon: DaemonProcess, bus: Bus
) -> None:
    """What the command publishes is exactly what the events worker reads from a ticket
    system: type agent.status, routing key agent.status, persistent, the until instant."""
    await asyncio.to_thread(load_examples, daemon)
    result = await asyncio.to_thread(
        daemon.cli,
        "agent",
        "status",
        "mehmet",
        "away",
        "--until",
        "2026-12-31T18:00+03:00",
        "--deputy",
        "ayse",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        "published agent.status: mehmet away until 2026-12-31T18:00:00+03:00, deputy ayse\n"
    )
    back = await asyncio.to_thread(daemon.cli, "agent", "status", "mehmet", "available")
    assert back.returncode == 0, back.stderr
    published = await events(bus)
    assert [m.routing_key for m in published] == ["agent.status", "agent.status"]
    away, available = (AgentStatus.model_validate_json(m.body) for m in published)
    assert (away.agent_id, away.status, away.deputy) == ("mehmet", "away", "ayse")
    assert away.until == datetime(2026, 12, 31, 15, tzinfo=UTC)
    assert (available.status, available.until, available.deputy) == ("available", None, None)
    first = published[0]
    assert first.type == schema_name(away)
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.user_id == "guest"  # stamped: the events worker trusts omniroute's own user
    assert first.message_id


@pytest.mark.parametrize(
    ("args", "code", "error"),
    [
        (
            ("ghost", "away"),
            1,
            "no agent 'ghost' in the directory",
        ),
        (
            ("mehmet", "away", "--deputy", "ghost"),
            1,
            "--deputy: no agent 'ghost' in the directory",
        ),
        (
            ("mehmet", "away", "--deputy", "mehmet"),
            2,
            "--deputy 'mehmet': an agent cannot stand in for themself",
        ),
        (
            ("mehmet", "away", "--until", "2026-12-31T18:00"),
            2,
            "--until '2026-12-31T18:00': give the offset (…+03:00, or Z for UTC)",
        ),
        (
            ("mehmet", "away", "--until", "tomorrow"),
            2,
            "--until 'tomorrow': not an RFC 3339 time (2026-12-31T23:30+03:00)",
        ),
        (
            ("mehmet", "available", "--until", "2026-12-31T18:00Z"),
            2,
            "--until and --deputy are for away or offline",
        ),
    ],
)
async def test_a_bad_agent_status_is_one_line_and_publishes_nothing(
    daemon: DaemonProcess, bus: Bus, args: tuple[str, ...], code: int, error: str
) -> None:
    """A typo never reaches the events queue (where it would be dead-lettered much later as
    unknown_agent, or pin an absence to a time zone nobody meant). Usage errors (exit 2) are
    found before the directory is even opened: here it is not migrated."""
    if code == 1:
        await asyncio.to_thread(load_examples, daemon)
    result = await asyncio.to_thread(daemon.cli, "agent", "status", *args)
    assert (result.returncode, result.stderr, result.stdout) == (code, f"omniroute: {error}\n", "")
    assert await events(bus) == []
