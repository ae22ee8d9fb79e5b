"""Issue 16's first-response clock: the teams.csv columns (first_response, escalate_to), the
customers' language, and working time counted in a team's opening hours."""

from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from routers import first_response
from routers.csv.importer import import_csv
from routers.models import Customer, Team
from routers.schedule import Schedule, WeeklyHours

IST = ZoneInfo("Europe/Istanbul")
BERLIN = ZoneInfo("Europe/Berlin")
OFFICE = Schedule(IST, WeeklyHours.parse("Mon-Fri 09:00-18:00"), country="TR")
TEAMS = "id,name,dial,email,first_response,escalate_to\n"


def at(*args: int, zone: ZoneInfo = IST) -> datetime:
    return datetime(*args, tzinfo=zone)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("start", "after", "due"),
    [
        # the example: Friday 17:55 with 4 h due is due Monday 12:55
        (at(2026, 12, 4, 17, 55), timedelta(hours=4), at(2026, 12, 7, 12, 55)),
        # received while closed (Saturday): the clock starts at Monday's opening
        (at(2026, 12, 5, 10, 0), timedelta(hours=4), at(2026, 12, 7, 13, 0)),
        # within one open stretch
        (at(2026, 12, 7, 10, 0), timedelta(minutes=30), at(2026, 12, 7, 10, 30)),
        # exactly to the closing minute stays that day
        (at(2026, 12, 7, 14, 0), timedelta(hours=4), at(2026, 12, 7, 18, 0)),
        # 20 working hours: Monday 8 h, Tuesday 9 h, Wednesday 3 h
        (at(2026, 12, 7, 10, 0), timedelta(hours=20), at(2026, 12, 9, 12, 0)),
        # 28 October is a half day in Turkey (open until 13:00), 29 October a holiday
        (at(2026, 10, 28, 12, 0), timedelta(hours=2), at(2026, 10, 30, 10, 0)),
    ],
)
def test_working_time_runs_only_while_the_team_is_open(
    start: datetime, after: timedelta, due: datetime
) -> None:
    assert first_response.add_working_time(OFFICE, start, after) == due


def test_working_time_across_a_clock_change_counts_real_hours() -> None:
    """Berlin's clocks go back at 03:00 on 25 October 2026: a night shift 22:00-06:00 is
    nine hours long that night, and the due time is the instant, not the wall time."""
    night = Schedule(BERLIN, WeeklyHours.parse("Sat 22:00-06:00"))
    start = at(2026, 10, 24, 22, 0, zone=BERLIN)
    due = first_response.add_working_time(night, start, timedelta(hours=8, minutes=30))
    assert due - start == timedelta(hours=8, minutes=30)
    assert due.astimezone(BERLIN).hour == 5  # 05:30 local, after the repeated hour


def test_no_schedule_or_never_open_falls_back_to_wall_time() -> None:
    start = at(2026, 12, 4, 17, 55)
    assert first_response.add_working_time(None, start, timedelta(hours=4)) == at(
        2026, 12, 4, 21, 55
    )
    closed = Schedule(IST, WeeklyHours.parse("closed"))
    assert first_response.add_working_time(closed, start, timedelta(hours=4)) == at(
        2026, 12, 4, 21, 55
    )


def test_the_column_parses_to_canonical_form_and_refuses_what_it_cannot_read() -> None:
    times = first_response.parse("SMS = 15m ; email=1h30m;voice=-")
    assert times == {"sms": timedelta(minutes=15), "email": timedelta(minutes=90), "voice": None}
    assert first_response.canonical(times) == "email=1h30m;sms=15m;voice=-"
    for bad, said in [
        ("email=4", "bad duration '4'"),
        ("fax=1h", "bad first_response 'fax=1h'"),
        ("email", "bad first_response 'email'"),
        ("email=0s", "more than 0 and at most 30 days"),
        ("email=800h", "more than 0 and at most 30 days"),
        ("email=1h;email=2h", "names email twice"),
    ]:
        with pytest.raises(ValueError, match=said):
            first_response.parse(bad)


async def test_the_columns_are_stored_canonical_and_bad_cells_reject_their_row(
    db: AsyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "teams.csv"
    path.write_text(
        TEAMS
        + "lead,Leads,,,email=30m,\n"
        + "billing,Billing,,,sms=15m; email=4h;voice=-,lead\n"
        + "network,Network,,,email=2h,agent:Zeynep\n"
        + "bad1,Bad,,,email=4 hours,\n"
        + "bad2,Bad,,,email=1h,bad2\n"
        + "bad3,Bad,,,email=1h,agent:\n",
        encoding="utf-8",
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert [(r.line, r.reason) for r in report.rejects] == [
        (5, "bad duration '4 hours': use e.g. 4h, 15m, 90s or 1h30m"),
        (6, "escalate_to 'bad2' is the team itself"),
        (7, "escalate_to 'agent:' names no agent"),
    ]
    async with db.connect() as conn:
        stored = set(
            (await conn.execute(select(Team.id, Team.first_response, Team.escalate_to))).all()
        )
    assert stored == {
        ("lead", "email=30m", None),
        ("billing", "email=4h;sms=15m;voice=-", "lead"),
        ("network", "email=2h", "agent:Zeynep"),
    }


async def test_an_escalation_loop_is_rejected_and_a_chain_is_not(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """a -> b -> c is a chain; c -> a would close a loop (with b -> c stored by an earlier
    import), and so would a team escalating to one later in the file that escalates back."""
    first = tmp_path / "first.csv"
    first.write_text(TEAMS + "c,C,,,,\nb,B,,,,c\na,A,,,email=1h,b\n", encoding="utf-8")
    assert (await import_csv(db, first, kind=None, region="TR", dry_run=False)).rejects == []
    second = tmp_path / "second.csv"
    second.write_text(
        TEAMS + "c,C,,,,a\nx,X,,,,y\ny,Y,,,,x\nz,Z,,,,agent:ana\n", encoding="utf-8"
    )
    report = await import_csv(db, second, kind=None, region="TR", dry_run=False)
    assert [(r.line, r.reason) for r in report.rejects] == [
        (2, "escalate_to loops: c -> a -> b -> c"),
        (4, "escalate_to loops: y -> x -> y"),
    ]
    async with db.connect() as conn:
        chain = dict((await conn.execute(select(Team.id, Team.escalate_to))).all())
    assert chain == {"a": "b", "b": "c", "c": None, "x": "y", "z": "agent:ana"}


async def test_an_unknown_escalation_team_is_named_by_its_line(
    db: AsyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "teams.csv"
    path.write_text(TEAMS + "a,A,,,,ghost\nb,B,,,,later\nlater,Later,,,,\n", encoding="utf-8")
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert [(r.line, r.reason) for r in report.rejects] == [
        (2, "unknown escalate_to team 'ghost': not in the file or the directory")
    ]


async def test_a_customers_language_is_checked_and_an_old_header_keeps_it(
    db: AsyncEngine, tmp_path: Path
) -> None:
    path = tmp_path / "customers.csv"
    path.write_text(
        "id,name,team,emails,phones,twitter,language\n"
        "c1,Kemal,,k@example.com,,,TR\n"
        "c2,Emily,,e@example.com,,,en_GB\n"
        "c3,Nobody,,n@example.com,,,turkish!\n",
        encoding="utf-8",
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert [(r.line, r.reason) for r in report.rejects] == [
        (4, "bad language 'turkish!': use an ISO 639 code, e.g. tr or en")
    ]
    old = tmp_path / "old.csv"
    old.write_text("id,name,team,emails,phones,twitter\nc1,Kemal Ö,,k@example.com,,\n")
    assert (await import_csv(db, old, kind=None, region="TR", dry_run=False)).rejects == []
    async with db.connect() as conn:
        languages = dict((await conn.execute(select(Customer.id, Customer.language))).all())
    assert languages == {"c1": "tr", "c2": "en-gb"}
