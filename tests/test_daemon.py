"""The daemon as a process: it loses nothing when killed, drains on SIGTERM, and its
command line answers a user's mistakes in one line."""

import asyncio
import json
import signal
from pathlib import Path

import pytest
from sqlalchemy import update

from ingest.bus import Bus
from ingest.schema import Identity, InboundMessage
from ingest.topology import ROUTED_QUEUE, ROUTER_QUEUE
from routers.models import Team
from routers.store.engine import create_engine
from tests.daemon_fixtures import DaemonProcess
from tests.seed import seeded
from tests.support.broker import filled, publish_inbound, tally, wait_consumers
from tests.support.net import free_port, wait_listening


def _messages(n: int) -> list[InboundMessage]:
    senders = ["ayse@acme.test", "it@globex.test", "stranger@nowhere.test", "0532 111 22 33"]
    out = []
    for i in range(n):
        sender = senders[i % len(senders)]
        kind = "phone" if sender[0].isdigit() else "email"
        out.append(
            InboundMessage(
                channel="sms" if kind == "phone" else "email",
                external_id=f"ext-{i}",
                sender=Identity(kind=kind, address=sender),  # type: ignore[arg-type]
                text="x" * 500,
            )
        )
    return out


@pytest.mark.slow
async def test_sigkill_mid_flow_loses_nothing(
    daemon: DaemonProcess, bus: Bus, sqlite_url: str, tmp_path: Path
) -> None:
    """A router killed between receive and ack redelivers; every message is routed."""
    await seeded(sqlite_url)
    # 1500: after the first 300 routed, a prefetch window in flight and a queue behind it
    messages = _messages(1500)
    await publish_inbound(bus, messages)
    proc = daemon.start("router", log=tmp_path / "daemon.log")
    await wait_consumers(bus, ROUTER_QUEUE)
    await filled(bus, ROUTED_QUEUE, 300)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    left, _ = await bus.queue_depth(ROUTER_QUEUE)
    assert left > 0, "the kill must land mid-flow for this test to mean anything"

    daemon.start("router", log=tmp_path / "daemon.log")
    counts = await tally(bus, ROUTED_QUEUE, {m.id for m in messages}, timeout=90)
    lost = [m.id for m in messages if m.id not in counts]
    duplicated = sum(c - 1 for c in counts.values())
    print(f"offered={len(messages)} routed={len(counts)} lost={len(lost)} duplicated={duplicated}")
    assert not lost


@pytest.mark.slow
async def test_sigterm_drains_and_exits_zero(
    daemon: DaemonProcess, bus: Bus, sqlite_url: str, tmp_path: Path
) -> None:
    """systemd stops the unit with SIGTERM: in-flight work finishes, exit status 0."""
    await seeded(sqlite_url)
    messages = _messages(600)
    await publish_inbound(bus, messages)
    proc = daemon.start("router", "events", log=tmp_path / "daemon.log")
    await wait_consumers(bus, ROUTER_QUEUE)
    await filled(bus, ROUTED_QUEUE, 100)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 25) == 0
    log = (tmp_path / "daemon.log").read_text()
    assert '"daemon.stopped"' in log
    assert "Traceback" not in log
    daemon.start("router", log=tmp_path / "daemon.log")
    counts = await tally(bus, ROUTED_QUEUE, {m.id for m in messages}, timeout=60)
    assert {m.id for m in messages} <= counts.keys()


def test_schema_prints_every_message_type(daemon: DaemonProcess) -> None:
    result = daemon.cli("schema")
    assert result.returncode == 0
    schemas = json.loads(result.stdout)
    assert {"omniroute.inbound.v1", "omniroute.routed.v1", "omniroute.reply.v1"} <= set(schemas)
    assert schemas["omniroute.inbound.v1"]["properties"]["channel"]["enum"] == [
        "email",
        "sms",
        "voice",
        "twitter",
        "whatsapp",
    ]


def test_bad_configuration_is_one_line_and_exit_2(daemon: DaemonProcess, tmp_path: Path) -> None:
    """A typo in the config must name the key, not print a traceback."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[routing]\ndefault_region = "XX"\nsticky_fo = 3\n', encoding="utf-8")
    result, missing = daemon.cli_all(
        ("--config", str(bad), "check"), ("--config", str(tmp_path / "nope.toml"), "run")
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert "routing.default_region" in result.stderr
    assert "routing.sticky_fo: unknown key" in result.stderr
    assert missing.returncode == 2
    assert "config file not found" in missing.stderr


def test_directory_migrate(daemon: DaemonProcess) -> None:
    result = daemon.cli("directory", "migrate")
    assert result.returncode == 0, result.stderr
    assert "schema revision 0005" in result.stdout


async def test_explain_and_check(daemon: DaemonProcess, sqlite_url: str) -> None:
    """An operator asks why a sender goes where it goes, and whether everything is reachable."""
    await seeded(sqlite_url)
    result, as_json, check = await asyncio.to_thread(
        daemon.cli_all,
        ("route", "explain", "--channel", "sms", "--from", "0532 111 22 33"),
        ("route", "explain", "--channel", "voice", "--from", "+905321112233", "--json"),
        ("check",),
    )
    assert result.returncode == 0, result.stderr
    assert "customer:  acme (Acme Ltd)" in result.stdout
    assert "route:     team.billing" in result.stdout
    assert "reason:    dedicated_team" in result.stdout
    decision = json.loads(as_json.stdout)
    assert decision["dial"] == "+902125550100"
    assert decision["route"]["reason"] == "dedicated_team"

    assert check.returncode == 0, check.stdout + check.stderr
    assert "broker" in check.stdout


async def test_explain_at_a_time_shows_the_calendar_that_decided(
    daemon: DaemonProcess, sqlite_url: str
) -> None:
    """Issue 15: ``--at`` decides as of that time, and the step names the rule that applied."""
    await seeded(sqlite_url)
    engine = create_engine(sqlite_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                update(Team)
                .where(Team.id == "billing")
                .values(
                    hours="Mon-Fri 09:00-18:00",
                    timezone="Europe/Istanbul",
                    holidays="TR",
                    after_hours_dial="sip:voicemail-billing@pbx.test",
                    first_response="email=4h",
                )
            )
    finally:
        await engine.dispose()

    def explain(at: str) -> tuple[str, ...]:
        return ("route", "explain", "--channel", "voice", "--from", "+905321112233", "--at", at)

    saturday, monday_json, republic_day, naive, friday = await asyncio.to_thread(
        daemon.cli_all,
        explain("2026-12-26T23:30+03:00"),
        (*explain("2026-12-28T06:30Z"), "--json"),
        explain("2026-10-29T10:00+03:00"),
        explain("2026-12-26T23:30"),
        # issue 16: a mail at Friday 17:55 with 4 h for a first answer is due Monday 12:55
        ("route", "explain", "--channel", "email", "--from", "ayse@acme.test")
        + ("--at", "2026-12-04T17:55+03:00"),
    )
    assert saturday.returncode == 0, saturday.stderr
    assert (
        "dedicated_team: billing; team billing closed: Sat 23:30 Europe/Istanbul, opens Mon 09:00"
        "; no after-hours team, it waits there"
    ) in saturday.stdout
    assert "opens at:  2026-12-28T09:00:00+03:00" in saturday.stdout
    assert "dial:      sip:voicemail-billing@pbx.test" in saturday.stdout
    monday = json.loads(monday_json.stdout)
    assert monday["route"]["reason"] == "dedicated_team"
    assert monday["route"]["opens_at"] is None
    assert monday["dial"] == "+902125550100"
    assert "holiday Cumhuriyet Bayramı" in republic_day.stdout
    assert naive.returncode == 2
    assert naive.stderr.count("\n") == 1
    assert "--at '2026-12-26T23:30': give the offset" in naive.stderr
    assert "answer by: 2026-12-07T09:55:00+00:00 (the team's first_response)" in friday.stdout


async def test_explain_shows_why_an_unproven_sender_is_not_the_customer(
    daemon: DaemonProcess, sqlite_url: str, tmp_path: Path
) -> None:
    """Issue 13: an operator sees what a spoofed mail or call gets, and why."""
    await seeded(sqlite_url)
    config = tmp_path / "trusting.toml"
    config.write_text(
        daemon.config.read_text() + '[email]\ntrusted_authserv_ids = ["mx.support.test"]\n',
        encoding="utf-8",
    )

    def explain(*args: str) -> tuple[str, ...]:
        return ("--config", str(config), "route", "explain", *args)

    spoofed, usual, call, wrong = await asyncio.to_thread(
        daemon.cli_all,
        explain("--channel", "email", "--from", "ayse@acme.test", "--auth", "dmarc=fail,spf=fail"),
        explain("--channel", "email", "--from", "ayse@acme.test"),
        explain(
            *("--channel", "voice", "--from", "+905321112233"),
            *("--verstat", "TN-Validation-Failed-A", "--json"),
        ),
        explain("--channel", "email", "--from", "ayse@acme.test", "--auth", "dmarc"),
    )
    assert spoofed.returncode == 0, spoofed.stderr
    assert "customer:  acme by address only, no context" in spoofed.stdout
    assert "auth:      spf=fail dkim=none dmarc=fail, required" in spoofed.stdout
    assert (
        "sender: DMARC fail at mx.support.test (spf=fail dkim=none), "
        "not taken as customer acme's own"
    ) in spoofed.stdout
    assert "route:     team.billing" in spoofed.stdout
    assert "reason:    unverified_sender" in spoofed.stdout
    assert "(assumed; --auth to change), required" in usual.stdout
    assert "reason:    dedicated_team" in usual.stdout
    decision = json.loads(call.stdout)
    assert (decision["route"]["reason"], decision["customer"]) == ("unverified_sender", None)
    assert decision["dial"] == "+902125550100"
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("omniroute: --auth:")


async def test_check_fails_when_the_broker_is_away(daemon: DaemonProcess, tmp_path: Path) -> None:
    config = tmp_path / "away.toml"
    config.write_text(
        daemon.config.read_text().replace(
            daemon.config.read_text().splitlines()[0],
            'amqp_url = "amqp://guest:guest@127.0.0.1:1/"',
        ),
        encoding="utf-8",
    )
    result = await asyncio.to_thread(daemon.cli, "--config", str(config), "check")
    assert result.returncode == 1
    assert "FAIL" in result.stdout
    assert "Traceback" not in result.stderr


async def _tail(daemon: DaemonProcess, bus: Bus, *args: str, garbled: bool = False) -> bytes:
    """``omniroute tail --count 1 ARGS``'s stdout, publishing a routed message (after a
    body no one can read, with ``garbled``) until tail is bound and has read one; its stderr
    must then name the garbled one."""
    import sys

    from ingest.schema import Route, RoutedMessage
    from ingest.topology import ROUTED

    command = ["-m", "config.cli", "--config", str(daemon.config), "tail", "--count", "1"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        *args,
        cwd=daemon.config.parent,
        env=daemon.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    routed = RoutedMessage(
        message=_messages(1)[0], route=Route(kind="team", target="billing", reason="dedicated_team")
    )
    try:
        async with asyncio.timeout(30):
            while proc.returncode is None:
                if garbled:
                    await bus.publish_body(
                        ROUTED, "team.billing", b"not json", message_id="garbled-1", type_=None
                    )
                await bus.publish(ROUTED, "team.billing", routed, message_id=routed.message.id)
                try:
                    async with asyncio.timeout(0.2):
                        await proc.wait()
                except TimeoutError:
                    pass
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    if garbled:
        assert "(unreadable message garbled-1)" in err.decode()
    return out


async def test_tail_prints_routed_messages(daemon: DaemonProcess, bus: Bus) -> None:
    """An operator watches routing live: one line per routed message, identities redacted."""
    out = await _tail(daemon, bus)
    assert b"team.billing" in out
    assert b"dedicated_team" in out
    assert b"a***@acme.test" in out


async def test_tail_json_keeps_stdout_json_and_says_unreadable_ones_on_stderr(
    daemon: DaemonProcess, bus: Bus
) -> None:
    """`tail --json > samples.jsonl` is `rules test`'s input: a message it cannot read is
    said on stderr, and stdout holds JSON lines alone."""
    import json

    out = await _tail(daemon, bus, "--json", garbled=True)
    [line] = out.decode().splitlines()
    assert json.loads(line)["route"]["target"] == "billing"


async def test_http_answers_while_the_broker_is_away_at_start(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """A restart during a broker outage must still take webhooks in (the spool keeps them),
    so HTTP comes up first; readiness says what is missing."""
    import httpx

    port = free_port()
    text = daemon.config.read_text()
    text = text.replace(text.splitlines()[0], 'amqp_url = "amqp://guest:guest@127.0.0.1:1/"')
    daemon.config.write_text(text.replace("port = 0", f"port = {port}"), encoding="utf-8")
    proc = daemon.start(log=tmp_path / "daemon.log")
    await wait_listening(port)
    async with httpx.AsyncClient(timeout=2) as client:
        health = await client.get(f"http://127.0.0.1:{port}/healthz")
        assert health.status_code == 200
        ready = await client.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 503
        assert any(p.startswith("broker") for p in ready.json()["problems"])
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 20) == 0
