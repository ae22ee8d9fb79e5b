"""Issue 15's and 16's directory columns, checked and put in canonical form: a team's time
zone, hours, holiday country, first-response times and escalation target, an agent's hours
and capacity, a customer's language, a holidays.csv date and hours.

Sole purpose: turn what an operator typed into what the router reads back (with
``routers.schedule`` and ``routers.availability``, the very parsers it uses), so a typo is a
rejected row named by its line, never a surprise at routing time, and the same hours
written two ways are stored alike. Each function takes the cell's text, returns None for
an empty cell and raises ``ValueError`` with a one-line message for the operator.
"""

import re
from datetime import date

#: the widths of the columns these values are stored in (routers.models)
LIMITS = {"timezone": 64, "hours": 400, "holidays": 16, "capacity": 400}
LIMITS |= {"first_response": 400, "escalate_to": 200, "language": 16}
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LANGUAGE = re.compile(r"[a-z]{2,3}(-[a-z0-9]{2,8})?")


def _fits(column: str, value: str) -> str:
    if len(value) > LIMITS[column]:
        raise ValueError(f"{column} longer than {LIMITS[column]} characters")
    return value


def timezone(text: str) -> str | None:
    """An IANA zone name as the tz database spells it (``Europe/Istanbul``)."""
    from routers.schedule import parse_timezone

    return _fits("timezone", parse_timezone(text).key) if text.strip() else None


def hours(text: str) -> str | None:
    """Weekly hours in ``routers.schedule``'s canonical form (``Mon-Fri 09:00-18:00``).

    Empty stays None, not "around the clock": for an agent it means "the team's hours"."""
    from routers.schedule import WeeklyHours

    return _fits("hours", str(WeeklyHours.parse(text))) if text.strip() else None


def country(text: str) -> str | None:
    """A holiday calendar of the ``holidays`` package, upper-cased (``TR``, ``DE-BY``)."""
    from routers.public_holidays import check_country

    return _fits("holidays", check_country(text)) if text.strip() else None


def capacity(text: str) -> str | None:
    """Per-channel capacity in canonical form (``email=20;sms=5``); empty: unlimited."""
    from routers.availability import format_capacity, parse_capacity

    return _fits("capacity", format_capacity(parse_capacity(text))) or None


def day(text: str) -> date:
    """A holidays.csv date, ISO 8601's ``YYYY-MM-DD`` only (``28.10.2026`` is ambiguous)."""
    value = text.strip()
    if not value:
        raise ValueError("missing date")
    if not _DATE.fullmatch(value):
        raise ValueError(f"bad date {value[:40]!r}: use YYYY-MM-DD, e.g. 2026-12-31")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"bad date {value!r}: no such day") from None


def spans(text: str) -> str | None:
    """A company day's hours (``09:00-13:00``) in canonical form; empty: closed all day."""
    from routers.schedule import parse_spans

    if not text.strip():
        return None
    return _fits("hours", ",".join(str(span) for span in parse_spans(text)))


def first_response(text: str) -> str | None:
    """Per-channel first-response times in canonical form (``email=4h;sms=15m;voice=-``)."""
    from routers import first_response as times

    return _fits("first_response", times.canonical(times.parse(text))) or None


def escalate_to(text: str) -> str | None:
    """A team id or ``agent:<id>``; whether it exists, and that a chain of teams does not
    loop, the writer checks."""
    from routers.first_response import target

    if not text.strip():
        return None
    kind, who = target(text)
    return _fits("escalate_to", f"agent:{who}" if kind == "agent" else who)


def language(text: str) -> str | None:
    """An ISO 639 language tag, lower case (``tr``, ``en``, ``pt-br``)."""
    value = text.strip().lower().replace("_", "-")
    if not value:
        return None
    if not _LANGUAGE.fullmatch(value):
        raise ValueError(f"bad language {text.strip()[:40]!r}: use an ISO 639 code, e.g. tr or en")
    return _fits("language", value)
