"""Working calendars (issue 15), table by table: the hours format users type into CSV files,
open/closed at the edges, Turkish holidays and their half-day eves, company days, DST, and
next_opening agreeing with status for random schedules."""

import re
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routers.schedule import (
    ALWAYS,
    CLOSED,
    DAYS,
    CompanyDay,
    Schedule,
    Span,
    WeeklyHours,
    check_country,
    parse_spans,
    parse_timezone,
)

IST = parse_timezone("Europe/Istanbul")
NYC = parse_timezone("America/New_York")
UTC_ZONE = parse_timezone("UTC")
WEEK = "Mon-Fri 09:00-18:00"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def utc(instant: datetime | None) -> datetime | None:
    """Compare instants in UTC: == between zones is always False in a repeated hour
    (PEP 495), so 01:30 EDT in New York never equals 05:30Z."""
    return instant and instant.astimezone(UTC)


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        pytest.param(WEEK, WEEK, id="weekdays"),
        pytest.param(" mon-FRI 9:00 - 18:00 ", WEEK, id="case-spaces-one-digit-hour"),
        pytest.param(f"{WEEK}; Sat 10:00-14:00", f"{WEEK}; Sat 10:00-14:00", id="two-clauses"),
        pytest.param("Mon,Wed,Fri 09:00-12:00,13:00-18:00", "same", id="lists"),
        pytest.param("Fri-Mon 10:00-12:00", "Mon,Fri-Sun 10:00-12:00", id="wrapping-range"),
        pytest.param("Mon 09:00-12:00,11:00-13:00,13:00-14:00", "Mon 09:00-14:00", id="merge"),
        pytest.param(
            f"{WEEK}; Mon 18:00-20:00", "Mon 09:00-20:00; Tue-Fri 09:00-18:00", id="merge-clauses"
        ),
        pytest.param("Fri 22:00-02:00", "same", id="over-midnight"),
        pytest.param("Sat 22:00-00:00", "Sat 22:00-24:00", id="to-midnight"),
        # 26 hours can't be one range: written as two that merge back.
        pytest.param(
            "Mon 00:00-24:00,22:00-02:00", "Mon 00:00-13:00,13:00-02:00", id="longer-than-a-day"
        ),
        pytest.param("", "Mon-Sun 00:00-24:00", id="empty-always"),
        pytest.param("   ", "Mon-Sun 00:00-24:00", id="blank-always"),
        pytest.param("Closed", "closed", id="closed"),
    ],
)
def test_hours_parse_and_canonical_form(text: str, canonical: str) -> None:
    """What an operator wrote comes back in one canonical spelling that parses to the same."""
    hours = WeeklyHours.parse(text)
    assert str(hours) == (text if canonical == "same" else canonical)
    assert WeeklyHours.parse(str(hours)) == hours


@pytest.mark.parametrize(
    ("text", "days"),
    [
        pytest.param(WEEK, [((540, 1080),)] * 5 + [()] * 2, id="weekdays"),
        pytest.param("Fri 22:00-02:00", [()] * 4 + [((1320, 1560),)] + [()] * 2, id="night"),
        pytest.param(
            "Sun 09:00-12:00,13:00-15:00", [()] * 6 + [((540, 720), (780, 900))], id="two"
        ),
        pytest.param("", [((0, 1440),)] * 7, id="always"),
    ],
)
def test_hours_parse_to_spans(text: str, days: list[tuple[tuple[int, int], ...]]) -> None:
    """A range over midnight belongs to its first day and ends past 1440."""
    assert WeeklyHours.parse(text).days == tuple(tuple(Span(*s) for s in d) for d in days)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(
            "Mon-Fry 09:00-18:00",
            "unknown day 'Fry' (Mon, Tue, Wed, Thu, Fri, Sat, Sun)",
            id="unknown-day",
        ),
        pytest.param("Mon 25:00-26:00", "bad time '25:00'", id="hour-25"),
        pytest.param("Mon 09:60-10:00", "bad time '09:60'", id="minute-60"),
        pytest.param("Mon 9-17", "bad time '9'", id="no-minutes"),
        pytest.param("Mon 24:00-02:00", "bad time '24:00'", id="24-starts"),
        pytest.param("Mon 09:00-24:30", "bad time '24:30'", id="after-24"),
        pytest.param("Mon-Fri", "missing time ranges after 'Mon-Fri'", id="no-ranges"),
        pytest.param("09:00-18:00", "missing day before '09:00-18:00'", id="no-day"),
        pytest.param("Mon 09:00-18:00;", "empty clause between ';'", id="trailing-semicolon"),
        pytest.param("Mon 09:00-18:00;;Tue 10:00-11:00", "empty clause", id="empty-clause"),
        pytest.param("Mon 09:00-09:00", "time range '09:00-09:00' has zero length", id="zero"),
        pytest.param("Mon 09:00", "bad time range '09:00' (HH:MM-HH:MM)", id="no-end"),
        pytest.param("Mon 09:00-10:00-11:00", "bad time range '09:00-10:00-11:00'", id="3-times"),
        pytest.param("Mon 09:00-12:00,,13:00-14:00", "empty time range", id="empty-range"),
        pytest.param("Mon,,Tue 09:00-10:00", "missing day in 'Mon,,Tue'", id="empty-day"),
        pytest.param("Mon- 09:00-10:00", "missing day in 'Mon-'", id="open-day-range"),
    ],
)
def test_hours_rejected_with_the_reason(text: str, problem: str) -> None:
    """A typo in teams.csv is reported as one line naming the text and the bad part."""
    with pytest.raises(ValueError, match="^" + re.escape(f"hours {text!r}: {problem}")) as raised:
        WeeklyHours.parse(text)
    assert "\n" not in str(raised.value)


def test_bad_time_message_says_the_format() -> None:
    """The message for a bad time tells the user what a good one looks like."""
    message = (
        "hours 'Mon 25:00-26:00': bad time '25:00' (HH:MM, 00:00 to 24:00, 24:00 only as an end)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        WeeklyHours.parse("Mon 25:00-26:00")


@pytest.mark.parametrize(
    ("text", "spans"),
    [
        pytest.param("09:00-13:00", (Span(540, 780),), id="half-day"),
        pytest.param("13:00-15:00, 09:00-12:00", (Span(540, 720), Span(780, 900)), id="two"),
    ],
)
def test_company_day_hours(text: str, spans: tuple[Span, ...]) -> None:
    """holidays.csv's hours column is time ranges only."""
    assert parse_spans(text) == spans


@pytest.mark.parametrize("text", ["", "Mon 09:00-13:00", "9-13"])
def test_company_day_hours_rejected(text: str) -> None:
    """An empty or malformed hours cell is an error, not a silently closed day."""
    with pytest.raises(ValueError, match=r"^hours '"):
        parse_spans(text)


def test_timezone_and_country_checks() -> None:
    """Unknown zones and holiday countries fail at import time with a readable message."""
    assert parse_timezone(" Europe/Istanbul ").key == "Europe/Istanbul"
    for name in ["Europe/Istambul", "", "Europe", "../etc/passwd", "/etc/localtime"]:
        with pytest.raises(ValueError, match=f"^unknown time zone {name!r}$"):
            parse_timezone(name)
    assert [check_country(c) for c in ("TR", "tr", " de-by ")] == ["TR", "TR", "DE-BY"]
    with pytest.raises(ValueError, match="^unknown holiday country 'XX'"):
        check_country("XX")
    with pytest.raises(ValueError, match="^unknown holiday country 'TUR'"):
        check_country("TUR")
    with pytest.raises(ValueError, match="^unknown subdivision 'US-ZZ'"):
        check_country("US-ZZ")
    with pytest.raises(ValueError, match="^unknown holiday country 'XX'"):
        Schedule(IST, country="XX")


PICNIC, NYE, ON_DUTY, INVENTORY = (
    "Şirket pikniği",
    "Yılbaşı arifesi",
    "Cumhuriyet nöbeti",
    "Envanter sayımı",
)
COMPANY = (
    CompanyDay(date(2026, 6, 5), PICNIC),
    CompanyDay(date(2026, 12, 31), NYE, parse_spans("09:00-13:00")),
    CompanyDay(date(2026, 10, 29), ON_DUTY, parse_spans("10:00-14:00")),
    CompanyDay(date(2026, 6, 6), INVENTORY, parse_spans("10:00-12:00")),
)
SCHEDULES = {
    "ist": Schedule(IST, WeeklyHours.parse(f"{WEEK}; Wed,Fri 22:00-02:00"), "TR"),
    "ist-24h": Schedule(IST, ALWAYS, "TR"),
    "acme": Schedule(IST, WeeklyHours.parse(WEEK), "TR", COMPANY),
    "nyc": Schedule(NYC, WeeklyHours.parse("Mon-Fri 09:00-17:00; Sun 02:30-04:00"), "US"),
    "nyc-fold": Schedule(NYC, WeeklyHours.parse("Sun 01:30-02:30")),
    "nyc-gap": Schedule(NYC, WeeklyHours.parse("Sun 02:00-02:30")),
    "scl": Schedule(parse_timezone("America/Santiago"), WeeklyHours.parse("Sun 00:00-02:00")),
}
KURBAN = "Kurban Bayramı"
KURBAN_EVE = "Kurban Bayramı (saat 13.00'ten)"
REPUBLIC = "Cumhuriyet Bayramı"
REPUBLIC_EVE = "Cumhuriyet Bayramı (saat 13.00'ten)"
RAMAZAN_EVE = "Ramazan Bayramı (saat 13.00'ten)"
LABOUR = "Emek ve Dayanışma Günü"
CHILDREN = "Ulusal Egemenlik ve Çocuk Bayramı"

# (schedule, instant, open, reason, holiday, opens_at); dates checked against the holidays
# package and the Diyanet calendar: Kurban Bayramı 2026 is 27-30 May (arife 26 May),
# Ramazan Bayramı 20-22 March (arife 19 March), Cumhuriyet Bayramı 29 October (eve 28).
STATUS = [
    # Edges: start inclusive, end exclusive.
    ("ist", "2026-05-04T09:00+03:00", True, "open", None, None),
    ("ist", "2026-05-04T08:59:59+03:00", False, "closed", None, "2026-05-04T09:00+03:00"),
    ("ist", "2026-05-04T17:59:59.999+03:00", True, "open", None, None),
    ("ist", "2026-05-04T18:00+03:00", False, "closed", None, "2026-05-05T09:00+03:00"),
    ("ist", "2026-05-04T06:00Z", True, "open", None, None),
    ("ist", "2026-05-02T23:30+03:00", False, "closed", None, "2026-05-04T09:00+03:00"),
    # Over midnight: Wednesday's night runs into Thursday's holiday; Friday's is a holiday.
    ("ist", "2026-04-22T22:00+03:00", True, "open", None, None),
    ("ist", "2026-04-23T01:59+03:00", True, "open", CHILDREN, None),
    ("ist", "2026-04-23T02:00+03:00", False, "closed", CHILDREN, "2026-04-24T09:00+03:00"),
    ("ist", "2026-04-23T10:00+03:00", False, "holiday", CHILDREN, "2026-04-24T09:00+03:00"),
    ("ist", "2026-05-01T23:00+03:00", False, "holiday", LABOUR, "2026-05-04T09:00+03:00"),
    ("ist", "2026-05-02T01:00+03:00", False, "holiday", LABOUR, "2026-05-04T09:00+03:00"),
    # Kurban Bayramı: the arife is open until 13:00, then five days off and a weekend.
    ("ist", "2026-05-26T09:00+03:00", True, "open", KURBAN_EVE, None),
    ("ist", "2026-05-26T12:59:59+03:00", True, "open", KURBAN_EVE, None),
    ("ist", "2026-05-26T13:00+03:00", False, "holiday", KURBAN_EVE, "2026-06-01T09:00+03:00"),
    ("ist", "2026-05-26T17:59+03:00", False, "holiday", KURBAN_EVE, "2026-06-01T09:00+03:00"),
    ("ist", "2026-05-27T10:00+03:00", False, "holiday", KURBAN, "2026-06-01T09:00+03:00"),
    ("ist", "2026-05-30T11:00+03:00", False, "closed", KURBAN, "2026-06-01T09:00+03:00"),
    # Republic Day: closed; its eve's night range is cut by the half day.
    ("ist", "2026-10-28T12:00+03:00", True, "open", REPUBLIC_EVE, None),
    ("ist", "2026-10-28T13:00+03:00", False, "holiday", REPUBLIC_EVE, "2026-10-30T09:00+03:00"),
    ("ist", "2026-10-28T22:30+03:00", False, "holiday", REPUBLIC_EVE, "2026-10-30T09:00+03:00"),
    ("ist", "2026-10-29T10:00+03:00", False, "holiday", REPUBLIC, "2026-10-30T09:00+03:00"),
    ("ist", "2026-03-19T13:30+03:00", False, "holiday", RAMAZAN_EVE, "2026-03-23T09:00+03:00"),
    # Around the clock, the half day still ends at 13:00.
    ("ist-24h", "2026-05-26T12:59+03:00", True, "open", KURBAN_EVE, None),
    ("ist-24h", "2026-05-26T13:00+03:00", False, "holiday", KURBAN_EVE, "2026-05-31T00:00+03:00"),
    # Company days: a full day, a half day over New Year, one that opens a national holiday,
    # one that opens a Saturday.
    ("acme", "2026-06-05T10:00+03:00", False, "holiday", PICNIC, "2026-06-06T10:00+03:00"),
    ("acme", "2026-06-06T11:59+03:00", True, "open", INVENTORY, None),
    ("acme", "2026-06-06T12:00+03:00", False, "closed", INVENTORY, "2026-06-08T09:00+03:00"),
    ("acme", "2026-12-31T12:00+03:00", True, "open", NYE, None),
    ("acme", "2026-12-31T14:00+03:00", False, "holiday", NYE, "2027-01-04T09:00+03:00"),
    ("acme", "2026-10-29T09:30+03:00", False, "holiday", ON_DUTY, "2026-10-29T10:00+03:00"),
    ("acme", "2026-10-29T13:59+03:00", True, "open", ON_DUTY, None),
    ("acme", "2026-10-28T13:00+03:00", False, "holiday", REPUBLIC_EVE, "2026-10-29T10:00+03:00"),
    # New York, 8 March 2026: 02:00-03:00 is skipped; Sunday's 02:30 opening comes at 03:00.
    ("nyc", "2026-03-06T22:00Z", False, "closed", None, "2026-03-08T07:00Z"),
    ("nyc", "2026-03-08T06:59:59Z", False, "closed", None, "2026-03-08T07:00Z"),
    ("nyc", "2026-03-08T07:00Z", True, "open", None, None),
    ("nyc", "2026-03-08T07:59:59Z", True, "open", None, None),
    ("nyc", "2026-03-08T08:00Z", False, "closed", None, "2026-03-09T13:00Z"),
    ("nyc", "2026-03-09T12:59Z", False, "closed", None, "2026-03-09T13:00Z"),
    # A range wholly inside the skipped hour does not happen that day.
    ("nyc-gap", "2026-03-08T06:59Z", False, "closed", None, "2026-03-15T06:00Z"),
    # Santiago skips midnight on 6 September 2026: Sunday's 00:00 opening comes at 01:00.
    ("scl", "2026-09-05T12:00Z", False, "closed", None, "2026-09-06T04:00Z"),
    ("scl", "2026-09-06T04:00Z", True, "open", None, None),
    ("scl", "2026-09-06T04:59Z", True, "open", None, None),
    ("scl", "2026-09-06T05:00Z", False, "closed", None, "2026-09-13T03:00Z"),
    # New York, 1 November 2026: 01:00-02:00 happens twice; 02:30 comes once, at 07:30Z.
    ("nyc", "2026-10-30T21:00Z", False, "closed", None, "2026-11-01T07:30Z"),
    ("nyc", "2026-11-01T09:00Z", False, "closed", None, "2026-11-02T14:00Z"),
    ("nyc", "2026-11-02T14:00Z", True, "open", None, None),
    ("nyc", "2026-11-26T15:00Z", False, "holiday", "Thanksgiving Day", "2026-11-27T14:00Z"),
    ("nyc-fold", "2026-11-01T05:30Z", True, "open", None, None),
    ("nyc-fold", "2026-11-01T05:59:59Z", True, "open", None, None),
    ("nyc-fold", "2026-11-01T06:00Z", False, "closed", None, "2026-11-01T06:30Z"),
    ("nyc-fold", "2026-11-01T06:30Z", True, "open", None, None),
    ("nyc-fold", "2026-11-01T07:30Z", False, "closed", None, "2026-11-08T06:30Z"),
    ("nyc-fold", "2026-03-08T06:30Z", True, "open", None, None),
    ("nyc-fold", "2026-03-08T07:00Z", False, "closed", None, "2026-03-15T05:30Z"),
    # Istanbul keeps +03:00 while Europe and America change their clocks.
    ("ist", "2026-03-30T05:59:59Z", False, "closed", None, "2026-03-30T06:00Z"),
    ("ist", "2026-10-26T06:00Z", True, "open", None, None),
    ("ist", "2026-11-02T05:59Z", False, "closed", None, "2026-11-02T06:00Z"),
]


@pytest.mark.parametrize(
    ("schedule", "instant", "is_open", "reason", "holiday", "opens_at"),
    [pytest.param(*row, id=f"{row[0]}-{row[1]}") for row in STATUS],
)
def test_status(
    schedule: str,
    instant: str,
    is_open: bool,
    reason: str,
    holiday: str | None,
    opens_at: str | None,
) -> None:
    """Open or not, why, and the exact instant it opens, in the team's own zone."""
    s = SCHEDULES[schedule]
    status = s.status(at(instant))
    assert (status.open, status.reason, status.holiday) == (is_open, reason, holiday)
    assert utc(status.opens_at) == (utc(at(opens_at)) if opens_at else None)
    if status.opens_at is not None:
        assert status.opens_at.tzinfo is s.timezone
        assert s.status(status.opens_at).open
        # Subtract in UTC: aware arithmetic in a zone is wall-clock arithmetic.
        assert not s.status(status.opens_at.astimezone(UTC) - timedelta(seconds=1)).open
    expected_next = at(instant) if is_open else status.opens_at
    assert utc(s.next_opening(at(instant))) == utc(expected_next)


@pytest.mark.parametrize(
    ("schedule", "instant", "line"),
    [
        ("ist", "2026-05-02T23:30+03:00", "closed: Sat 23:30 Europe/Istanbul, opens Mon 09:00"),
        ("ist", "2026-05-04T10:00+03:00", "open: Mon 10:00 Europe/Istanbul, until 18:00"),
        ("ist", "2026-04-22T23:00+03:00", "open: Wed 23:00 Europe/Istanbul, until Thu 02:00"),
        (
            "ist",
            "2026-05-26T10:00+03:00",
            f"open ({KURBAN_EVE}): Tue 10:00 Europe/Istanbul, until 13:00",
        ),
        (
            "ist",
            "2026-05-27T10:00+03:00",
            "holiday Kurban Bayramı: Wed 10:00 Europe/Istanbul, opens Mon 09:00",
        ),
        (
            "ist",
            "2026-05-30T11:00+03:00",
            "closed (Kurban Bayramı): Sat 11:00 Europe/Istanbul, opens Mon 09:00",
        ),
        (
            "nyc-fold",
            "2026-11-01T07:30Z",
            "closed: Sun 02:30 America/New_York, opens Sun 2026-11-08 01:30",
        ),
    ],
)
def test_describe(schedule: str, instant: str, line: str) -> None:
    """route explain shows the team's own clock and when it opens or closes."""
    assert SCHEDULES[schedule].describe(at(instant)) == line


def test_never_open_and_the_400_day_horizon() -> None:
    """A schedule that never opens answers None instead of searching forever."""
    never = Schedule(UTC_ZONE, CLOSED)
    start = at("2026-01-01T00:00Z")
    assert never.next_opening(start) is None
    assert never.status(start) == never.status(start + timedelta(days=3))
    assert never.status(start).opens_at is None
    assert never.describe(start) == "closed: Thu 00:00 UTC, not open within 400 days"
    assert Schedule(UTC_ZONE).describe(start) == "open: Thu 00:00 UTC, no closing within 400 days"
    once = Schedule(
        UTC_ZONE, CLOSED, None, (CompanyDay(date(2027, 1, 5), "Sayım", parse_spans("10:00-12:00")),)
    )
    assert once.next_opening(start) == at("2027-01-05T10:00Z")
    assert once.next_opening(at("2025-11-01T00:00Z")) is None  # 430 days ahead
    assert once.next_opening(at("2025-12-31T00:00Z")) == at("2027-01-05T10:00Z")
    assert once.describe(start) == "closed: Thu 00:00 UTC, opens Tue 2027-01-05 10:00"


def test_naive_datetimes_are_rejected() -> None:
    """A naive datetime has no instant: refusing it beats guessing the server's zone."""
    s = SCHEDULES["ist"]
    for call in (s.status, s.next_opening, s.describe):
        with pytest.raises(ValueError, match="^naive datetime 2026-05-04T10:00:00: "):
            call(datetime(2026, 5, 4, 10, 0))


def test_company_days_on_one_date_are_rejected() -> None:
    """Two holidays.csv rows for one team and date would make the day ambiguous."""
    day = date(2026, 6, 5)
    with pytest.raises(ValueError, match="^two company days on the same date$"):
        Schedule(IST, company_days=(CompanyDay(day, "a"), CompanyDay(day, "b")))


ZONES = ["UTC", "Europe/Istanbul", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]
# 2026 offset changes: New York 8 Mar and 1 Nov; Lord Howe (30 minutes) 5 Apr and 4 Oct;
# Santiago (at midnight) 5 Apr and 6 Sep.
CHANGES = [datetime(2026, m, d, tzinfo=UTC) for m, d in ((3, 8), (11, 1), (4, 5), (10, 4), (9, 6))]
span = st.tuples(st.integers(0, 95), st.integers(1, 95)).map(
    lambda t: Span(t[0] * 15, t[0] * 15 + t[1] * 15)
)
week = st.lists(st.lists(span, max_size=2), min_size=7, max_size=7).filter(any)
instants = st.one_of(
    st.integers(0, 365 * 86400).map(
        lambda s: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=s)
    ),
    st.tuples(st.sampled_from(CHANGES), st.integers(-3 * 86400, 3 * 86400)).map(
        lambda t: t[0] + timedelta(seconds=t[1])
    ),
)


def weekly(days: list[list[Span]]) -> WeeklyHours:
    """Through the text format, so random schedules also test parse and str."""
    clauses = (f"{day} {s}" for day, spans in zip(DAYS, days, strict=True) for s in spans)
    return WeeklyHours.parse("; ".join(clauses))


@settings(max_examples=100, deadline=None)
@given(
    days=week, zone=st.sampled_from(ZONES), country=st.sampled_from([None, "TR"]), start=instants
)
def test_next_opening_is_the_first_open_instant(
    days: list[list[Span]], zone: str, country: str | None, start: datetime
) -> None:
    """next_opening(at) is open and nothing before it from at is: exact across DST changes."""
    hours = weekly(days)
    assert WeeklyHours.parse(str(hours)) == hours
    schedule = Schedule(parse_timezone(zone), hours, country)
    found = schedule.next_opening(start)
    assert found is not None
    assert found >= start
    assert schedule.status(found).open
    # Spans are whole quarter hours, and so are these zones' offsets and changes: opening
    # can only happen at ``start`` or on a quarter hour, so those are the probes.
    quarter = start.replace(minute=start.minute // 15 * 15, second=0, microsecond=0)
    probes = [start] + [quarter + timedelta(minutes=15 * k) for k in range(1, 4 * 24 * 40)]
    for probe in probes:
        if probe >= found:
            break
        assert not schedule.status(probe).open, probe
