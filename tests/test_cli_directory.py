"""`omniroute directory import|export|show` as an operator runs it: every bad row named with
its line, exit 1 when any row was rejected, `--dry-run` changes nothing; `show` prints a
team's calendar or an agent's presence and load."""

import asyncio
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

from routers.models import AgentPresence, Assignment
from routers.store.engine import create_engine
from tests.daemon_fixtures import ROOT, DaemonProcess
from tests.support import directory

EXAMPLES = ROOT / "config" / "examples"
KINDS = ("teams", "agents", "customers", "holidays")


def load_examples(daemon: DaemonProcess) -> None:
    directory.load_examples(daemon.config)


def test_import_examples_then_export_round_trips(daemon: DaemonProcess, tmp_path: Path) -> None:
    refused = daemon.cli("directory", "import", str(EXAMPLES / "teams.csv"))
    assert refused.returncode == 1, "no schema change outside `directory migrate`"
    assert "run `omniroute directory migrate`" in refused.stderr
    assert daemon.cli("directory", "migrate").returncode == 0
    for kind in KINDS:
        shown = ("--progress",) if kind == "customers" else ()  # stderr is no terminal here
        result = daemon.cli("directory", "import", *shown, str(EXAMPLES / f"{kind}.csv"))
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"imported {kind}:"), "stdout: the summary alone"
        if shown:
            rows = len((EXAMPLES / "customers.csv").read_text(encoding="utf-8").splitlines()) - 1
            said = rf"customers\.csv: {rows} rows read in \d+ s; merging into the directory\n"
            assert re.fullmatch(said, result.stderr), result.stderr
        else:
            assert result.stderr == ""
    assert "imported holidays: 3 new, 0 updated, 0 removed, 0 rejected" in result.stdout
    exports = daemon.cli_all(  # they only read: at once
        *(
            ("directory", "export", "--kind", k, "--output", str(tmp_path / f"{k}.csv"))
            for k in KINDS
        )
    )
    for kind, exported in zip(KINDS, exports, strict=True):
        assert exported.returncode == 0, exported.stderr
        again = daemon.cli("directory", "import", str(tmp_path / f"{kind}.csv"))
        assert again.returncode == 0
        assert "0 new" in again.stdout
        assert "0 rejected" in again.stdout
    teams = (tmp_path / "teams.csv").read_text(encoding="utf-8").splitlines()
    assert teams[0] == (
        "id,name,dial,email,timezone,hours,holidays,after_hours,after_hours_dial,"
        "first_response,escalate_to"
    )
    assert (
        "billing,Billing,'+902125550100,billing@support.example.com,Europe/Istanbul,"
        "Mon-Fri 09:00-18:00,TR,oncall,sip:voicemail-billing@pbx.example.com,"
        "email=4h;sms=30m;voice=-;twitter=1h;whatsapp=30m,supervisors"
    ) in teams
    holidays = (tmp_path / "holidays.csv").read_text(encoding="utf-8").splitlines()
    assert holidays[:2] == [
        "team,date,name,hours",
        "billing,2026-12-31,Yılbaşı arifesi,09:00-13:00",
    ]


def test_rejected_rows_are_named_and_exit_1(daemon: DaemonProcess, tmp_path: Path) -> None:
    # migrate and import teams.csv, in-process: both commands run for real in the test above
    directory.load_examples(daemon.config, ("teams",))
    bad = tmp_path / "customers.csv"
    bad.write_text(
        "id,name,team,emails,phones,twitter\n"
        "c1,Good,billing,good@example.com,0532 111 22 33,\n"
        "c2,Bad phone,billing,bad@example.com,12,\n"
        "c3,No team,nosuchteam,x@example.com,,\n",
        encoding="utf-8",
    )
    dry = daemon.cli("directory", "import", "--dry-run", str(bad))
    assert dry.returncode == 1
    assert "would import" in dry.stdout
    listed = daemon.cli("directory", "export", "--kind", "customers")
    assert "c1" not in listed.stdout, "a dry run changes nothing"

    result = daemon.cli("directory", "import", str(bad))
    assert result.returncode == 1
    assert f"{bad}:3: rejected:" in result.stderr
    assert f"{bad}:4: rejected:" in result.stderr
    assert "Traceback" not in result.stderr
    assert "1 new" in result.stdout
    explained = daemon.cli("route", "explain", "--channel", "sms", "--from", "+905321112233")
    assert "customer:  c1 (Good)" in explained.stdout


def test_unreadable_file_is_one_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    directory.load_examples(daemon.config, ())  # migrated, empty
    odd = tmp_path / "odd.csv"
    odd.write_text("foo,bar\n1,2\n", encoding="utf-8")
    missing, result = daemon.cli_all(  # neither reads a row: at once
        ("directory", "import", str(tmp_path / "nope.csv")), ("directory", "import", str(odd))
    )
    assert missing.returncode != 0
    assert missing.stderr.startswith("omniroute: ")
    assert "Traceback" not in missing.stderr
    assert result.returncode != 0
    assert result.stderr.startswith("omniroute: ")


def test_schedule_rows_are_rejected_by_line(daemon: DaemonProcess, tmp_path: Path) -> None:
    """Issue 15's columns are checked row by row through the real command, old headers
    included, and a holidays file is recognised by its header."""
    load_examples(daemon)
    teams = tmp_path / "teams.csv"
    teams.write_text(
        "id,name,dial,email,timezone,hours\n"
        "t1,Good,,,Asia/Tokyo,Mon-Fri 09:00-17:00\n"
        "t2,Bad zone,,,Asia/Tokio,\n"
        "t3,Bad hours,,,,Mon-Fri 9-17\n",
        encoding="utf-8",
    )
    result = daemon.cli("directory", "import", str(teams))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{teams}:3: rejected: unknown time zone 'Asia/Tokio'",
        f"{teams}:4: rejected: hours 'Mon-Fri 9-17': bad time '9' "
        "(HH:MM, 00:00 to 24:00, 24:00 only as an end)",
    ]
    assert "imported teams: 1 new, 0 updated, 2 rejected" in result.stdout
    holidays = tmp_path / "days.csv"
    holidays.write_text(
        "team,date,name\nbilling,2027-04-23,Ulusal Egemenlik\nghost,2027-04-23,Nope\n",
        encoding="utf-8",
    )
    result = daemon.cli("directory", "import", "--dry-run", str(holidays))
    assert result.stderr.splitlines() == [f"{holidays}:3: rejected: unknown team 'ghost'"]
    assert "would import holidays: 1 new, 0 updated, 2 removed, 1 rejected" in result.stdout


def test_show_team_prints_its_calendar_and_next_opening(daemon: DaemonProcess) -> None:
    """An operator asking "why did billing's message go on call?" sees the team's hours, zone,
    holiday country, company days ahead and when it opens, as of any time."""
    load_examples(daemon)
    result, eve, oncall = daemon.cli_all(
        ("directory", "show", "team", "billing", "--at", "2026-12-26T23:30+03:00"),
        ("directory", "show", "team", "billing", "--at", "2026-12-31T10:00+03:00"),
        ("directory", "show", "team", "oncall"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "team:             billing",
        "name:             Billing",
        "dial:             +902125550100",
        "email:            billing@support.example.com",
        "timezone:         Europe/Istanbul",
        "hours:            Mon-Fri 09:00-18:00",
        "holidays:         TR",
        "after_hours:      oncall",
        "after_hours_dial: sip:voicemail-billing@pbx.example.com",
        "first_response:   email=4h;sms=30m;voice=-;twitter=1h;whatsapp=30m",
        "escalate_to:      supervisors",
        "status:           closed: Sat 23:30 Europe/Istanbul, opens Mon 09:00",
        "opens at:         2026-12-28T09:00:00+03:00",
        "company days:     2026-12-31 Thu Yılbaşı arifesi (open 09:00-13:00)",
        "                  2027-01-15 Fri Şirket kuruluş günü (closed)",
    ]
    assert "status:           open (Yılbaşı arifesi): Thu 10:00 Europe/Istanbul, until 13:00" in (
        eve.stdout
    )
    assert "status:           open: no hours, holidays or company days (always open)" in (
        oncall.stdout
    )
    assert "company days:     none in the next 60 days" in oncall.stdout


async def test_show_agent_prints_presence_deputy_and_load(
    daemon: DaemonProcess, sqlite_url: str
) -> None:
    """An agent's status, who stands in, whether they are at work and how many unanswered
    messages they hold per channel against their capacity (within routing.load_window)."""
    await asyncio.to_thread(load_examples, daemon)
    at = datetime(2026, 12, 28, 7, tzinfo=UTC)  # Monday 10:00 in Istanbul: billing is open
    engine = create_engine(sqlite_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(AgentPresence),
                [
                    {
                        "agent_id": "mehmet",
                        "status": "away",
                        "at": at - timedelta(hours=1),
                        "until": at + timedelta(hours=2),
                        "deputy": "ayse",
                    }
                ],
            )
            await conn.execute(
                insert(Assignment),
                [
                    {
                        "message_id": f"m{n}",
                        "agent_id": "ayse",
                        "customer_id": "c-1001",
                        "channel": channel,
                        "assigned_at": at - timedelta(hours=hours),
                        "closed_at": at if closed else None,
                    }
                    for n, (channel, hours, closed) in enumerate(
                        [
                            ("email", 1, False),
                            ("email", 7, False),
                            ("email", 9, False),  # older than the 8 h load window
                            ("email", 2, True),  # answered
                            ("twitter", 1, False),  # no capacity set: unlimited
                        ]
                    )
                ],
            )
    finally:
        await engine.dispose()

    def show(agent: str) -> list[str]:
        result = daemon.cli("directory", "show", "agent", agent, "--at", at.isoformat())
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    mehmet, ayse = await asyncio.gather(
        asyncio.to_thread(show, "mehmet"), asyncio.to_thread(show, "ayse")
    )
    assert mehmet[:10] == [
        "agent:            mehmet",
        "name:             Mehmet Demir",
        "team:             billing",
        "email:            mehmet.demir@support.example.com",
        "phone:            +905324001002",
        "dial:             sip:mehmet@pbx.example.com",
        "active:           true",
        "deputy:           ayse",
        "capacity:         email=20;sms=5;twitter=10;whatsapp=5",
        "hours:            -",
    ]
    assert mehmet[10:12] == [
        "presence:         away since 2026-12-28T06:00:00+00:00, until 2026-12-28T09:00:00+00:00",
        "stands in:        ayse (the agent.status event)",
    ]
    assert "status:           open: Mon 10:00 Europe/Istanbul, until 18:00" in mehmet
    assert "presence:         available (no agent.status yet)" in ayse
    assert "stands in:        mehmet (agents.csv)" in ayse
    assert (
        "load:             email 2 of 20, sms 0 of 5, twitter 1, whatsapp 0 of 5 "
        "(unanswered, routed within routing.load_window 8 h)"
    ) in ayse


def test_show_unknown_id_is_one_line_exit_1(daemon: DaemonProcess) -> None:
    load_examples(daemon)
    *unknown, naive = daemon.cli_all(
        ("directory", "show", "team", "nobody"),
        ("directory", "show", "agent", "nobody"),
        ("directory", "show", "team", "billing", "--at", "2026-12-26T23:30"),
    )
    for what, result in zip(("team", "agent"), unknown, strict=True):
        assert result.returncode == 1
        assert result.stderr == f"omniroute: no {what} 'nobody' in the directory\n"
    assert naive.returncode == 2
    assert naive.stderr.count("\n") == 1
