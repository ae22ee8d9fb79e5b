"""Working calendars (issue 15): is a team or agent working at an instant, why not, and when
does it open next. Pure and I/O-free: the policy asks per message, on its hot path.

- ``WeeklyHours.parse(text)`` / ``str(hours)`` (canonical; parses back equal): the ``hours``
  column of teams.csv and agents.csv. ``parse_spans(text)``: holidays.csv's ``hours``.
- ``CompanyDay(day, name, hours=None)``: a holidays.csv row. No hours: closed all day;
  else open only then, *instead of* the weekly hours (a half day or a special opening).
- ``Schedule(timezone, hours=ALWAYS, country=None, company_days=())``: ``status(at)``,
  ``next_opening(at)``, ``describe(at)``, for a timezone-aware ``at``.
- ``parse_timezone(name)``, ``check_country(code)``: check the ``timezone`` and
  ``holidays`` columns. Errors are ``ValueError``s with a one-line message for users.

Hours: clauses separated by ``;``, each days then time ranges. Days: ``Mon``..``Sun`` (any
case), ranges (``Mon-Fri``; ``Fri-Mon`` wraps), lists (``Mon,Wed,Fri``). Time ranges:
``HH:MM-HH:MM``, 24-hour, ``24:00`` only as an end, separated by ``,``. A range whose end
is not after its start crosses midnight and belongs to its first day: ``Fri 22:00-02:00``
is closed when Friday is a holiday, whatever Saturday is. Overlapping ranges merge. Empty
text is ``ALWAYS`` (around the clock); ``closed`` is ``CLOSED`` (open only on company days
with hours). Example: ``Mon-Fri 09:00-12:00,13:00-18:00; Sat 10:00-14:00``.

Holidays: ``country`` ("TR", or "DE-BY") closes the public holidays of its calendar all day,
and Turkey's and Iceland's half days from 13:00 (``routers.public_holidays``). A company
day replaces a country holiday.

Time: hours are wall-clock times in the schedule's zone. Nothing opens in a skipped hour
until the clock jumps (then the new wall time decides); a repeated hour is judged by its
wall time both times. ``next_opening`` is exact to the second (assuming no zone changes its
offset twice a day); compare its result in UTC, as ``==`` across zones is False in a
repeated hour (PEP 495). ``describe``'s "until" is the wall-clock end.
"""

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Literal, NamedTuple, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from routers.public_holidays import check_country, holidays_of

DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
DAY = 24 * 60  # minutes
HORIZON = timedelta(days=400)
_DAY_INDEX = {name.lower(): i for i, name in enumerate(DAYS)}
_TIME = re.compile(r"(\d{1,2}):(\d\d)")
Reason = Literal["open", "closed", "holiday"]
_Stretch = tuple[datetime, datetime, bool]  # closed in [from, to); whether ``to`` is open


class Span(NamedTuple):
    """Open from ``start`` to ``end`` (exclusive), minutes after its day's midnight; an
    ``end`` past 1440 runs into the next morning but still belongs to its own day."""

    start: int
    end: int

    def __str__(self) -> str:
        start, end = self
        if end > DAY and end - start >= DAY:  # too long for one range: halves that merge back
            return f"{Span(start, (end + 1) // 2)},{Span((end + 1) // 2, end)}"
        return "-".join(f"{m // 60:02d}:{m % 60:02d}" for m in (start, end % DAY or end))


def _fail(text: str, problem: str) -> ValueError:
    return ValueError(f"hours {text!r}: {problem}")


def _minute(text: str, token: str, *, end: bool) -> int:
    match = _TIME.fullmatch(token)
    minute = int(match[1]) * 60 + int(match[2]) if match and int(match[2]) < 60 else DAY + 1
    if minute > DAY or (minute == DAY and not end):
        raise _fail(text, f"bad time {token!r} (HH:MM, 00:00 to 24:00, 24:00 only as an end)")
    return minute


def _merge(spans: list[Span]) -> tuple[Span, ...]:
    out: list[Span] = []
    for span in sorted(spans):
        if out and span.start <= out[-1].end:
            out[-1] = Span(out[-1].start, max(out[-1].end, span.end))
        else:
            out.append(span)
    return tuple(out)


def _spans(text: str, part: str) -> list[Span]:
    spans = []
    for item in (raw.strip() for raw in part.split(",")):
        if not item:
            raise _fail(text, f"empty time range in {part.strip()!r}")
        if len(bounds := item.split("-")) != 2:
            raise _fail(text, f"bad time range {item!r} (HH:MM-HH:MM)")
        start = _minute(text, bounds[0].strip(), end=False)
        end = _minute(text, bounds[1].strip(), end=True)
        if end == start:
            raise _fail(text, f"time range {item!r} has zero length")
        spans.append(Span(start, end if end > start else end + DAY))
    return spans


def parse_spans(text: str) -> tuple[Span, ...]:
    """Parse ``09:00-13:00`` or ``09:00-12:00,13:00-15:00`` (a company day's hours)."""
    if not text.strip():
        raise _fail(text, "missing time ranges (HH:MM-HH:MM)")
    return _merge(_spans(text, text))


def _days(text: str, part: str) -> list[int]:
    out: list[int] = []
    for item in part.split(","):
        first, dash, last = (name.strip() for name in item.partition("-"))
        if not first or (dash and not last):
            raise _fail(text, f"missing day in {part!r}")
        for name in (first, last or first):
            if name.lower() not in _DAY_INDEX:
                raise _fail(text, f"unknown day {name!r} ({', '.join(DAYS)})")
        a, b = _DAY_INDEX[first.lower()], _DAY_INDEX[(last or first).lower()]
        out.extend((a + k) % 7 for k in range((b - a) % 7 + 1))
    return out


@dataclass(frozen=True)
class WeeklyHours:
    """Opening hours by weekday, Monday first: sorted, disjoint spans per day."""

    days: tuple[tuple[Span, ...], ...]

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse the hours format (module docstring); ValueError says what is wrong."""
        if text.strip().lower() in ("", "closed"):
            return cls((ALWAYS if not text.strip() else CLOSED).days)
        week: list[list[Span]] = [[] for _ in DAYS]
        for clause in (raw.strip() for raw in text.split(";")):
            if not clause:
                raise _fail(text, "empty clause between ';'")
            if (digit := re.search(r"\d", clause)) is None:
                raise _fail(text, f"missing time ranges after {clause!r}")
            if not (days := clause[: digit.start()].strip()):
                raise _fail(text, f"missing day before {clause!r}")
            spans = _spans(text, clause[digit.start() :])
            for day in _days(text, days):
                week[day] += spans
        return cls(tuple(_merge(day) for day in week))

    def __str__(self) -> str:
        groups: dict[tuple[Span, ...], list[list[int]]] = {}
        for day, spans in enumerate(self.days):  # runs of days with the same hours
            runs = groups.setdefault(spans, [])
            if runs and runs[-1][1] == day - 1:
                runs[-1][1] = day
            elif spans:
                runs.append([day, day])
        clauses = (
            ",".join(DAYS[a] if a == b else f"{DAYS[a]}-{DAYS[b]}" for a, b in runs)
            + f" {','.join(map(str, spans))}"
            for spans, runs in groups.items()
            if runs
        )
        return "; ".join(clauses) or "closed"


ALWAYS = WeeklyHours(((Span(0, DAY),),) * 7)
CLOSED = WeeklyHours(((),) * 7)


@dataclass(frozen=True)
class CompanyDay:
    """A holidays.csv row; see the module docstring for what ``hours`` means."""

    day: date
    name: str
    hours: tuple[Span, ...] | None = None


@dataclass(frozen=True, slots=True)
class Status:
    """Open or not at an instant. ``reason`` is ``holiday`` when the weekly hours say open
    but a holiday or company day closes. ``holiday`` names the local day's holiday (also
    when open on a half day), or the one that cut the night range it is in. ``opens_at``,
    when closed, is in the schedule's zone; None if not within 400 days."""

    open: bool
    reason: Reason
    holiday: str | None = None
    opens_at: datetime | None = None


_OPEN = Status(open=True, reason="open")


def parse_timezone(name: str) -> ZoneInfo:
    """The IANA zone ``name`` ("Europe/Istanbul"), or ValueError."""
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {name!r}") from None


class _Day(NamedTuple):
    spans: tuple[Span, ...]  # the hours in force that day
    weekly: tuple[Span, ...]  # the weekly hours, to tell "holiday" from "closed"
    holiday: str | None


def _inside(spans: tuple[Span, ...], minute: int) -> bool:
    # A loop, not any(): a third of the cost, on the router's hot path.
    for start, end in spans:  # noqa: SIM110
        if start <= minute < end:
            return True
    return False


def _local(at: datetime, zone: ZoneInfo) -> datetime:
    if at.utcoffset() is None:
        raise ValueError(f"naive datetime {at.isoformat()}: give a timezone-aware instant")
    return at.astimezone(zone)


def _offset(at: datetime, zone: ZoneInfo) -> timedelta:
    return at.astimezone(zone).utcoffset() or timedelta()  # a ZoneInfo always has one


def _transition(lo: datetime, hi: datetime, zone: ZoneInfo, offset: timedelta) -> datetime:
    """The first whole second in (lo, hi] whose UTC offset is not ``offset`` (lo has it, hi
    does not); tz database transitions fall on whole seconds."""
    a, b = math.floor(lo.timestamp()), math.ceil(hi.timestamp())
    while b - a > 1:
        mid = (a + b) // 2
        a, b = (mid, b) if datetime.fromtimestamp(mid, zone).utcoffset() == offset else (a, mid)
    return datetime.fromtimestamp(b, UTC)


@dataclass(frozen=True)
class Schedule:
    """When a team or agent works: weekly hours in a zone, minus holidays."""

    timezone: ZoneInfo
    hours: WeeklyHours = ALWAYS
    country: str | None = None
    company_days: tuple[CompanyDay, ...] = ()
    # Caches: company days by date, days by ordinal, and the last closed stretch found.
    _company: dict[date, CompanyDay] = field(init=False, compare=False, repr=False)
    _days: dict[int, _Day] = field(default_factory=dict, init=False, compare=False, repr=False)
    _memo: list[_Stretch] = field(default_factory=list, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.country is not None:
            object.__setattr__(self, "country", check_country(self.country))
        object.__setattr__(self, "_company", {c.day: c for c in self.company_days})
        if len(self._company) < len(self.company_days):
            raise ValueError("two company days on the same date")

    def _day(self, ordinal: int) -> _Day:
        if (day := self._days.get(ordinal)) is None:
            if len(self._days) > 4096:
                self._days.clear()
            day = self._days[ordinal] = self._build(date.fromordinal(ordinal))
        return day

    def _build(self, day: date) -> _Day:
        weekly = self.hours.days[day.weekday()]
        if (company := self._company.get(day)) is not None:
            return _Day(company.hours or (), weekly, company.name)
        if self.country and (holiday := holidays_of(self.country, day.year).get(day)):
            name, until = holiday  # None: all day; else a half day, open before ``until``
            half = () if until is None else [Span(s, min(e, until)) for s, e in weekly if s < until]
            return _Day(tuple(half), weekly, name)
        return _Day(weekly, weekly, None)

    def status(self, at: datetime) -> Status:
        """Open or not at ``at`` (timezone-aware), with the reason and the next opening."""
        local = _local(at, self.timezone)
        ordinal, minute = local.toordinal(), local.hour * 60 + local.minute
        today, yesterday = self._day(ordinal), self._day(ordinal - 1)
        if _inside(today.spans, minute) or _inside(yesterday.spans, minute + DAY):
            return _OPEN if today.holiday is None else Status(True, "open", today.holiday)
        cut = _inside(today.weekly, minute) or _inside(yesterday.weekly, minute + DAY)
        holiday = yesterday.holiday if cut and not _inside(today.weekly, minute) else today.holiday
        return Status(False, "holiday" if cut else "closed", holiday, self.next_opening(at))

    def next_opening(self, at: datetime) -> datetime | None:
        """The first instant >= ``at`` when open, in the schedule's zone; None if there is
        none within 400 days. Remembers the closed stretch it crossed, so asking again
        from inside it (a closed team, message after message) is a lookup."""
        _local(at, self.timezone)
        lo = start = at.astimezone(UTC)
        limit = start + HORIZON
        if self._memo and (memo := self._memo[-1])[0] <= start < memo[1]:
            if memo[2]:
                return memo[1].astimezone(self.timezone)
            lo, start = memo[0], memo[1]  # closed up to there: search on from it
        found = self._search(start, limit) if start < limit else None
        self._memo[:] = [(lo, found or max(limit, start), found is not None)]
        return found and found.astimezone(self.timezone)

    def _search(self, x: datetime, limit: datetime) -> datetime | None:
        """First open instant in [x, limit), a day (or up to a UTC offset change) at a time:
        within such a step, wall time is the instant plus a fixed offset."""
        offset = _offset(x, self.timezone)
        while x < limit:
            end = min(x + timedelta(days=1), limit)
            if _offset(end, self.timezone) != offset:
                end = _transition(x, end, self.timezone, offset)
            wall = (x + offset).replace(tzinfo=None)
            if (hit := self._first_open(wall, (end + offset).replace(tzinfo=None))) is not None:
                return (hit - offset).replace(tzinfo=UTC)
            x, offset = end, _offset(end, self.timezone)
        return None

    def _first_open(self, wall: datetime, wall_end: datetime) -> datetime | None:
        """First open wall time in [wall, wall_end): ``wall`` itself or a range's start."""
        if self._end_of(self._minutes(wall)) is not None:
            return wall
        ordinal = wall.toordinal()
        while (midnight := datetime.fromordinal(ordinal)) < wall_end:
            for span in self._day(ordinal).spans:
                if (start := midnight + timedelta(minutes=span.start)) > wall:
                    return start if start < wall_end else None
            ordinal += 1
        return None

    @staticmethod
    def _minutes(wall: datetime) -> int:  # wall-clock minutes since 0001-01-01, for _end_of
        return wall.toordinal() * DAY + wall.hour * 60 + wall.minute

    def _end_of(self, minute: int) -> int | None:
        """Where the ranges holding wall ``minute`` (see ``_minutes``) end, or None."""
        ordinal, of_day = divmod(minute, DAY)
        ends = [ordinal * DAY + e for s, e in self._day(ordinal).spans if s <= of_day < e]
        before = self._day(ordinal - 1).spans
        ends += [(ordinal - 1) * DAY + e for s, e in before if s <= of_day + DAY < e]
        return max(ends, default=None)

    def describe(self, at: datetime) -> str:
        """One line for ``route explain`` and logs, e.g. ``closed: Sat 23:30
        Europe/Istanbul, opens Mon 09:00``."""
        status, local = self.status(at), _local(at, self.timezone)
        now = f"{DAYS[local.weekday()]} {local:%H:%M} {self.timezone.key}"
        name = f" ({status.holiday})" if status.holiday else ""
        if not status.open:
            state = f"holiday {status.holiday}" if status.reason == "holiday" else f"closed{name}"
            opens = status.opens_at
            later = f"opens {_later(local, opens)}" if opens else "not open within 400 days"
            return f"{state}: {now}, {later}"
        if (then := self._closing(local)) is None:
            return f"open{name}: {now}, no closing within 400 days"
        return f"open{name}: {now}, until {_later(local, then)}"

    def open_until(self, at: datetime) -> datetime | None:
        """When the open stretch holding ``at`` ends (``at`` when closed); None: not within
        400 days. Issue 16's first-response clock runs only inside such stretches."""
        if not self.status(at).open:
            return at
        if (wall := self._closing(_local(at, self.timezone))) is None:
            return None
        closes = wall.replace(tzinfo=self.timezone).astimezone(UTC)  # instants, not wall times
        return max(at.astimezone(UTC), closes).astimezone(self.timezone)

    def _closing(self, local: datetime) -> datetime | None:
        """The wall time at which the open ranges holding wall ``local`` close, or None."""
        end: int | None = (minute := self._minutes(local))
        while end is not None and end < self._minutes(local) + HORIZON.days * DAY:
            minute, end = end, self._end_of(end)
        if end is not None:
            return None
        return datetime.fromordinal(minute // DAY) + timedelta(minutes=minute % DAY)


def _later(now: datetime, then: datetime) -> str:
    days, day = (then.date() - now.date()).days, DAYS[then.weekday()]
    when = "%H:%M" if not days else f"{day} %H:%M" if days < 7 else f"{day} %Y-%m-%d %H:%M"
    return then.strftime(when)
