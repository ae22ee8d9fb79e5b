"""``omniroute dead list|show|replay|purge`` (issue 17) on the real broker, against dead
letters that the real router and events worker refused: invalid JSON and a schema violation
on ``omniroute.inbound``, an ``agent.status`` naming an agent the directory lacks, and a
routed message pushed out of a capped ``omniroute.routed`` by the broker (the queue-cap
policy of docs/OPERATIONS.md). Listing must take nothing off the queue and keep its order;
a replay goes back where it came from once, recorded in its headers."""

import argparse
import asyncio
import json
import shlex
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from config.cli import build_parser
from config.dead import letters
from config.dead.cli import run as run_dead
from config.dead.letters import REPLAYED_AT_HEADER, REPLAYED_HEADER, DeadLetter
from config.dead.queue import DeadQueue
from config.settings import Settings
from ingest.bus import Bus
from ingest.errors import ConfigError
from ingest.health import Health
from ingest.schema import AgentStatus, Identity, InboundMessage, RoutedMessage
from ingest.settings import BusSettings
from ingest.topology import (
    DEAD,
    DEAD_QUEUE,
    EVENTS,
    INBOUND,
    REASON_HEADER,
    ROUTED_QUEUE,
    ROUTER_QUEUE,
    SOURCE_HEADER,
)
from routers.decider import DirectoryDecider
from routers.events import EventsWorker
from routers.models import Agent, AgentPresence
from routers.settings import EventsSettings, RouterSettings, RoutingSettings
from routers.store.engine import sessionmaker
from routers.worker import RouterWorker
from tests.daemon_fixtures import ROOT, DaemonProcess
from tests.seed import seed
from tests.support.broker import filled, opened_bus, rabbitmqctl, take
from tests.support.waiting import until

ROUTING = RoutingSettings(default_region="TR")
BUS = BusSettings(publish_timeout=10.0, transient_retry_for=0.2)
ACME_PHONE = "+905321112233"


@asynccontextmanager
async def omniroute(bus: Bus, engine: AsyncEngine, trust: EventsSettings) -> AsyncIterator[None]:
    """The real router and events worker consuming the test's vhost until the block ends."""
    settings = RouterSettings(prefetch=8)
    health = Health()
    router = RouterWorker(
        bus=bus,
        engine=engine,
        decider=DirectoryDecider(engine, ROUTING),
        routing=ROUTING,
        settings=settings,
        health=health,
    )
    events = EventsWorker(
        bus=bus, engine=engine, routing=ROUTING, settings=settings, health=health, trust=trust
    )
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(router.run(stop, drain_timeout=5)),
        asyncio.create_task(events.run(stop, drain_timeout=5)),
    ]
    try:
        await until(lambda: health.ready()[0], 15, "router and events worker consuming")
        yield
    finally:
        stop.set()
        async with asyncio.timeout(20):
            await asyncio.gather(*tasks)


async def dead_count(bus: Bus) -> int:
    return (await bus.queue_depth(DEAD_QUEUE))[0]


async def died(bus: Bus, n: int) -> None:
    """Wait until ``omniroute.dead`` holds ``n`` messages."""

    async def enough() -> bool:
        return await dead_count(bus) >= n

    await until(enough, 15, f"{n} dead letters")


async def listing(bus: Bus) -> list[DeadLetter]:
    """What ``dead list`` reads, in-process."""
    async with DeadQueue(bus) as dead:
        return [held.letter for held in await dead.read()]


def seen(letters: list[DeadLetter]) -> list[tuple[object, ...]]:
    """What a listing shows of each letter; not the broker's count of its deliveries, which
    each look adds one to."""
    return [
        (
            letter.id,
            letter.reason,
            letter.exchange,
            letter.routing_key,
            letter.dead_at,
            letter.size,
            {k: v for k, v in letter.headers.items() if k != "x-delivery-count"},
        )
        for letter in letters
    ]


def inbound(message_id: str, text: str = "hello") -> InboundMessage:
    return InboundMessage(
        id=message_id,
        channel="sms",
        external_id=f"SM-{message_id}",
        sender=Identity(kind="phone", address=ACME_PHONE),
        text=text,
    )


async def refuse_three(bus: Bus) -> None:
    """Dead letters made by omniroute itself, one after the other (so their order is known):
    invalid JSON and a schema violation refused by the router, an unknown agent refused by
    the events worker."""
    await bus.publish_body(
        INBOUND,
        "sms",
        b'{"channel": "sms", "sender": ',
        message_id="in-json",
        type_="omniroute.inbound.v1",
        headers={"x-trace": "t-1"},
    )
    await died(bus, 1)
    violation = inbound("in-schema", "call me on +90 532 111 22 33").model_dump(mode="json")
    violation["channel"] = "fax"
    violation["sender"] = {"kind": "email", "address": "ayse@acme.test"}
    await bus.publish_body(
        INBOUND,
        "sms",
        json.dumps(violation).encode(),
        message_id="in-schema",
        type_="omniroute.inbound.v1",
    )
    await died(bus, 2)
    event = AgentStatus(agent_id="nobody", status="away")
    await bus.publish(EVENTS, event.type, event, message_id="ev-nobody")
    await died(bus, 3)


async def test_listing_twice_shows_the_same_letters_in_order_and_stops_no_worker(
    engine: AsyncEngine, amqp_url: str
) -> None:
    """An operator looking at the dead letters must not lose, reorder or hold up anything:
    what a listing read goes back in its order (more than 32 of them: RabbitMQ scrambles
    that many returned at once), the workers route on while it holds them, a dead letter
    arriving meanwhile is kept, and a dozen listings (more than the delivery limit of the
    other queues) drop nothing."""
    await seed(engine)
    async with (
        opened_bus(amqp_url, settings=BUS, name="dead-test") as bus,
        omniroute(bus, engine, EventsSettings()),
    ):
        await refuse_three(bus)
        for n in range(40):  # a fuller queue: garbage of one kind, in a known order
            await bus.publish_body(
                INBOUND, "sms", f"garbage {n}".encode(), message_id=f"g-{n:02}", type_=None
            )
        await died(bus, 43)
        first = await listing(bus)
        second = await listing(bus)
        async with DeadQueue(bus) as dead:
            held = await dead.read()
            # while a command holds every dead letter, omniroute goes on: a good message is
            # routed, a bad one dead-lettered
            await bus.publish(INBOUND, "sms", inbound("in-ok"), message_id="in-ok")
            await bus.publish_body(INBOUND, "sms", b"late garbage", message_id="g-late", type_=None)
            [routed] = await take(bus, ROUTED_QUEUE, 1, timeout=15)
            assert routed.message_id == "in-ok"
            await died(bus, 1)  # ready beside the 43 held
        after = await listing(bus)
        again = await listing(bus)
        for _ in range(10):
            await listing(bus)
        last = await listing(bus)
    ids = [letter.id for letter in first]
    assert ids[:3] == ["in-json", "in-schema", "ev-nobody"]
    assert sorted(ids[3:]) == [f"g-{n:02}" for n in range(40)]  # the router's batch order
    assert seen(second) == seen(first)
    assert seen([h.letter for h in held]) == seen(first)
    # the late one is kept; a quorum queue puts the handed-back ones behind it
    assert [letter.id for letter in after] == ["g-late", *ids]
    assert seen(after[1:]) == seen(first)
    assert seen(again) == seen(after)
    assert seen(last) == seen(after)
    reasons = {letter.id: letter.reason for letter in first}
    assert reasons["in-json"].startswith("invalid JSON")
    assert reasons["in-schema"].startswith("schema violation")
    assert reasons["ev-nobody"].startswith("unknown_agent: ")
    assert (first[0].exchange, first[0].routing_key) == (INBOUND, "sms")
    assert (first[2].exchange, first[2].routing_key) == (EVENTS, "agent.status")
    # each listing handed every message back once: counted, nothing dropped
    assert int(last[1].headers.get("x-delivery-count", 0)) >= 15


def documented_policies(vhost: str) -> list[list[str]]:
    """The ``rabbitmqctl set_policy`` commands of docs/OPERATIONS.md's queue caps, for
    ``vhost`` instead of ``/`` (read from the page, so it cannot drift from what is tested)."""
    text = (ROOT / "docs" / "OPERATIONS.md").read_text(encoding="utf-8")
    section = text.split("### Capping `omniroute.routed` and `omniroute.dead`", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        if line.startswith("rabbitmqctl set_policy"):
            words = shlex.split(line, comments=True)
            at = words.index("-p")
            words[at + 1] = vhost
            commands.append(words)
    assert [c[c.index("-p") + 2] for c in commands] == [
        "omniroute-routed-cap",
        "omniroute-dead-cap",
    ]
    return commands


def cli_ok(daemon: DaemonProcess, *args: str) -> str:
    result = daemon.cli("dead", *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    # stderr is the command's log: its audit lines (dead.purged, …), never an error
    logged = [json.loads(line) for line in result.stderr.splitlines()]
    assert all(line["level"] in ("info", "warning") for line in logged), result.stderr
    return result.stdout


async def cli(daemon: DaemonProcess, *args: str) -> str:
    return await asyncio.to_thread(cli_ok, daemon, *args)


async def presence(engine: AsyncEngine, agent_id: str) -> str | None:
    async with sessionmaker(engine)() as session:
        status: str | None = await session.scalar(
            select(AgentPresence.status).where(AgentPresence.agent_id == agent_id)
        )
    return status


async def test_the_dead_commands_list_show_replay_and_purge_real_dead_letters(
    daemon: DaemonProcess, engine: AsyncEngine, amqp_url: str, vhost: str
) -> None:
    """The operator's round trip through the real ``omniroute`` command: what died and why,
    the body without customers' addresses, a replay that goes where the message came from
    (the invalid one dies again, the one whose agent now exists is applied, the one the
    queue cap pushed out is routed again), and old dead letters purged by age."""
    await seed(engine)
    for command in documented_policies(vhost):  # as docs/OPERATIONS.md has them, on this vhost
        rabbitmqctl(*command[1:])
    rabbitmqctl(  # the same policy, with a cap a test reaches
        "set_policy", "-p", vhost, "--priority", "10", "omniroute-routed-cap",
        r"^omniroute\.routed$", '{"max-length": 1, "overflow": "drop-head"}',
        "--apply-to", "queues",
    )  # fmt: skip
    async with (
        opened_bus(amqp_url, settings=BUS, name="dead-test") as bus,
        omniroute(bus, engine, EventsSettings()),
    ):

        async def capped() -> bool:
            out = await asyncio.to_thread(rabbitmqctl, "list_queues", "-p", vhost, "name", "policy")
            lines = out.splitlines()
            return {
                f"{ROUTED_QUEUE}\tomniroute-routed-cap",
                f"{DEAD_QUEUE}\tomniroute-dead-cap",
            } <= set(lines)

        await until(capped, 15, "the cap policy applied to omniroute.routed")
        await refuse_three(bus)
        await bus.publish(INBOUND, "sms", inbound("in-ok-1"), message_id="in-ok-1")
        await filled(bus, ROUTED_QUEUE, 1, timeout=15)
        await bus.publish(INBOUND, "sms", inbound("in-ok-2"), message_id="in-ok-2")
        await died(bus, 4)  # in-ok-1, pushed out of omniroute.routed by in-ok-2
        [kept] = await take(bus, ROUTED_QUEUE, 1, timeout=15)
        assert kept.message_id == "in-ok-2"
        before = await listing(bus)

        listed = [json.loads(line) for line in (await cli(daemon, "list", "--json")).splitlines()]
        assert [d["id"] for d in listed] == ["in-json", "in-schema", "ev-nobody", "in-ok-1"]
        assert listed[3]["reason"].startswith("maxlen: dead-lettered by the broker")
        assert (listed[3]["exchange"], listed[3]["routing_key"]) == (
            "omniroute.routed",
            "team.billing",
        )
        assert seen(await listing(bus)) == seen(before), "listing took or reordered something"

        shown = await cli(daemon, "show", "in-schema")
        assert "reason:       schema violation" in shown
        assert "came from:    omniroute.inbound/sms" in shown
        assert '"address": "a***@acme.test"' in shown
        assert "ayse@acme.test" not in shown
        assert "+90 532 111 22 33" not in shown
        assert '"channel": "fax"' in shown  # pretty-printed, one key a line
        full = await asyncio.to_thread(
            daemon.cli, "dead", "show", "in-schema", "--show-identities"
        )
        assert full.returncode == 0, full.stderr
        assert '"address": "ayse@acme.test"' in full.stdout
        assert "+90 532 111 22 33" in full.stdout
        # the audit line on stderr, the command's log; stdout is the letter alone
        audit = [json.loads(line) for line in full.stderr.splitlines()]
        assert [(a["event"], a["id"]) for a in audit] == [("dead.identities_shown", "in-schema")]
        assert "identities_shown" not in full.stdout

        dry = await cli(daemon, "replay", "--all", "--dry-run")
        assert dry.splitlines()[-1] == "would replay 4 of 4 dead letters"
        assert seen(await listing(bus)) == seen(before)

        async with sessionmaker(engine).begin() as session:  # the fix: the agent now exists
            session.add(
                Agent(
                    id="nobody",
                    name="No Body",
                    team_id="billing",
                    dial="client:nobody",
                    active=True,
                )
            )
        replayed = await cli(daemon, "replay", "in-json", "ev-nobody", "in-ok-1")
        assert replayed.splitlines() == [
            "replayed in-json -> omniroute.inbound/sms",
            "replayed ev-nobody -> omniroute.events/agent.status",
            "replayed in-ok-1 -> omniroute.routed/team.billing",
            "replayed 3 of 3 dead letters",
        ]
        [back] = await take(bus, ROUTED_QUEUE, 1, timeout=15)
        await until(lambda: presence(engine, "nobody"), 15, "the replayed status applied")
        await died(bus, 2)  # in-schema, and in-json again
        assert await presence(engine, "nobody") == "away"
        after = await listing(bus)

        old = datetime.now(UTC) - timedelta(days=3)
        channel = await bus.connection.channel()
        await (await channel.get_exchange(DEAD)).publish(
            aio_pika.Message(
                b"old garbage",
                message_id="old-1",
                timestamp=old,
                headers={REASON_HEADER: "invalid JSON: old", SOURCE_HEADER: f"{INBOUND}/sms"},
            ),
            "sms",
        )
        await channel.close()
        purged = await cli(daemon, "purge", "--older-than", "2d")
        table = await cli(daemon, "list")
        remaining = await listing(bus)
    assert back.message_id == "in-ok-1"
    assert RoutedMessage.model_validate_json(back.body).message.id == "in-ok-1"
    assert back.headers[REPLAYED_HEADER] == 1
    assert REPLAYED_AT_HEADER in back.headers
    assert "x-death" not in back.headers
    assert [letter.id for letter in after] == ["in-schema", "in-json"]
    again = after[1]
    assert again.reason.startswith("invalid JSON"), "it died again, with its reason"
    assert again.replayed == 1
    assert again.headers["x-trace"] == "t-1"
    assert purged.splitlines()[-1].startswith("purged 1 dead letters that died before ")
    assert [letter.id for letter in remaining] == ["in-schema", "in-json"]
    lines = table.splitlines()
    assert lines[0].split() == ["ID", "DEAD", "AT", "(UTC)", "REASON", "FROM"]
    assert lines[1].startswith("in-schema ")
    assert lines[2].startswith("in-json ")
    assert lines[2].endswith("omniroute.inbound/sms  (replayed 1x)")
    assert lines[-1] == "2 dead letters in omniroute.dead"


async def test_user_errors_are_one_line_and_change_nothing(daemon: DaemonProcess, bus: Bus) -> None:
    """A typo must not replay or remove anything, and must say what was wrong."""
    await bus.publish_body(INBOUND, "sms", b"x", message_id="m-1", type_=None)
    channel = await bus.connection.channel()
    queue = await channel.get_queue(ROUTER_QUEUE)
    message = await queue.get(timeout=5)
    await bus.dead_letter(message, "invalid JSON: by hand")  # as a consumer does
    await message.ack()
    await channel.close()
    cases = [
        (("replay",), 2, "omniroute: dead replay: give IDs, --reason R or --all (one of them)"),
        (("replay", "m-1", "nosuch"), 1, "omniroute: no dead letter 'nosuch' in omniroute.dead"),
    ]
    for args, code, error in cases:
        result: subprocess.CompletedProcess[str] = await asyncio.to_thread(
            daemon.cli, "dead", *args
        )
        assert result.returncode == code, (args, result.stderr)
        assert result.stderr.startswith(error), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert [letter.id for letter in await listing(bus)] == ["m-1"]


def test_a_dead_letter_without_a_message_id_is_named_by_a_stable_digest() -> None:
    """Another client's message may lack a message id (aiormq, under aio-pika, always sets
    one, so it is read here from what the broker would hand over): the name must not change
    from one listing to the next, and two deaths of one body must differ."""
    at = datetime(2026, 12, 7, 9, tzinfo=UTC)

    def read(body: bytes, when: datetime, count: int) -> DeadLetter:
        headers = {REASON_HEADER: "bug: ValueError", "x-delivery-count": count}
        return letters.read(
            body,
            headers,
            message_id=None,
            type_=None,
            content_type=None,
            timestamp=when,
            keep_body=False,
        )

    first = read(b"{}", at, 0)
    assert first.id.startswith("sha256:")
    assert read(b"{}", at, 7).id == first.id, "another look, the same name"
    assert read(b"{}", at + timedelta(seconds=1), 0).id != first.id
    assert first.named(first.id)
    with pytest.raises(ConfigError, match="--older-than 'a week': give a number and s, m, h or d"):
        letters.age("a week", "--older-than")
    assert letters.age("36h", "--older-than") == timedelta(hours=36)
    assert first.replay_problem() == (
        "no source exchange recorded (published to omniroute.dead by hand?)"
    )


async def test_an_untrusted_publishers_event_is_never_replayed(
    engine: AsyncEngine, amqp_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dead copy carries omniroute's own user, which the events worker always believes:
    replaying it would launder an event the trust check refused."""
    await seed(engine)
    trust = EventsSettings(trusted_publishers=["tickets"])
    async with (
        opened_bus(amqp_url, settings=BUS, name="dead-test") as bus,
        omniroute(bus, engine, trust),
    ):
        channel = await bus.connection.channel()
        event = AgentStatus(agent_id="ana", status="away")
        await (await channel.get_exchange(EVENTS)).publish(  # no user_id: nobody vouches
            aio_pika.Message(event.model_dump_json().encode(), message_id="ev-stranger"),
            event.type,
        )
        await channel.close()
        await died(bus, 1)
        args = build_parser().parse_args(["dead", "replay", "--reason", "untrusted_publisher"])
        assert isinstance(args, argparse.Namespace)
        settings = Settings(amqp_url=SecretStr(amqp_url), bus=BUS)
        code = await run_dead(args, settings)
        [letter] = await listing(bus)
    printed = capsys.readouterr().out.splitlines()  # the workers' log lines too
    out = [line for line in printed if line.startswith(("skipped ", "replayed ", "failed "))]
    assert code == 1
    assert out[0].startswith("skipped ev-stranger: untrusted_publisher: replaying would")
    assert out[-1] == "replayed 0 of 1 dead letters"
    assert letter.id == "ev-stranger"
    assert await presence(engine, "ana") is None
