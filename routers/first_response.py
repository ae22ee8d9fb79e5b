"""First-response times (issue 16): how soon a team's customers must hear back, counted in
the team's opening hours, and whom a message escalates to when nobody answered in time.

- teams.csv ``first_response``: per channel, ``email=4h;sms=15m;voice=-`` (``-``: none);
  durations ``90s``, ``15m``, ``4h``, ``1h30m``. ``parse`` / ``canonical`` (the stored form, parses
  back equal) raise ``ValueError`` with one line for the operator.
- teams.csv ``escalate_to``: a team id, or ``agent:<id>`` (the team lead); ``target``
  splits it.
- ``add_working_time(schedule, start, duration)``: the instant ``duration`` of the
  schedule's open time after ``start``: a mail at Friday 17:55 to a team open until 18:00
  with 4 h due is due Monday 12:55 (5 minutes on Friday, 3 h 55 min from 09:00 Monday).

Pure and I/O-free: the decider asks per message, on its hot path.
"""

import re
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, get_args

from ingest.schema import Channel
from routers.schedule import Schedule

if TYPE_CHECKING:
    from routers.directory import TeamRecord

CHANNELS: tuple[str, ...] = get_args(Channel)
_DURATION = re.compile(r"(?:(\d{1,4})h)?(?:(\d{1,5})m)?(?:(\d{1,6})s)?")
#: the longest first-response time: beyond it a "due time" says nothing
LONGEST = timedelta(days=30)
#: the most open stretches crossed while adding working time (a stretch is a day or less)
_STRETCHES = 2000


def duration(text: str) -> timedelta:
    """``4h``, ``15m``, ``90s``, ``1h30m``: a positive time of at most 30 days."""
    value = text.strip().lower()
    found = _DURATION.fullmatch(value)
    if not value or found is None:
        raise ValueError(f"bad duration {text.strip()[:40]!r}: use e.g. 4h, 15m, 90s or 1h30m")
    hours, minutes, seconds = (int(part or 0) for part in found.groups())
    after = timedelta(hours=hours, minutes=minutes, seconds=seconds)
    if not after or after > LONGEST:
        raise ValueError(f"bad duration {text.strip()!r}: more than 0 and at most 30 days")
    return after


def _text(after: timedelta) -> str:
    hours, rest = divmod(int(after.total_seconds()), 3600)
    minutes, seconds = divmod(rest, 60)
    return "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s")) if n)


@lru_cache(maxsize=256)
def parse(text: str | None) -> dict[str, timedelta | None]:
    """The column's times per channel (None: ``-``, no first-response time there)."""
    out: dict[str, timedelta | None] = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        channel, equals, value = (p.strip() for p in part.partition("="))
        channel = channel.lower()
        if not equals or channel not in CHANNELS:
            raise ValueError(
                f"bad first_response {part.strip()[:60]!r}: use channel=time;... with channels "
                f"{', '.join(CHANNELS)}, e.g. email=4h;sms=15m"
            )
        if channel in out:
            raise ValueError(f"first_response names {channel} twice")
        if channel == "voice" and value != "-":  # the call is over: nobody to answer later
            raise ValueError("first_response: voice must be '-' (the PBX handles a missed call)")
        out[channel] = None if value == "-" else duration(value)
    return out


def canonical(times: dict[str, timedelta | None]) -> str:
    """The column's canonical text, channels in the schema's order."""
    written = {c: "-" if after is None else _text(after) for c, after in times.items()}
    return ";".join(f"{c}={written[c]}" for c in CHANNELS if c in written)


def target(text: str) -> tuple[str, str]:
    """``escalate_to`` as (kind, id): ``("team", "billing")`` or ``("agent", "ana")``."""
    kind, colon, who = text.strip().partition(":")
    if colon and kind.strip().lower() == "agent":
        if not who.strip():
            raise ValueError("escalate_to 'agent:' names no agent")
        return "agent", who.strip()
    return "team", text.strip()


def respond_by(
    team: "TeamRecord | None", schedule: Schedule | None, channel: str, at: datetime
) -> datetime | None:
    """When a message on ``channel`` routed to ``team`` at ``at`` must have its first
    answer; None when the team sets no time for it. A malformed stored column (written by
    hand, not by the import) counts as none: routing never fails on it."""
    if team is None or not team.first_response:
        return None
    try:
        after = parse(team.first_response).get(channel)
    except ValueError:
        return None
    return None if after is None else add_working_time(schedule, at, after)


def add_working_time(schedule: Schedule | None, start: datetime, after: timedelta) -> datetime:
    """``start`` plus ``after`` of the schedule's open time (no schedule: around the clock).
    A schedule that does not open within its horizon stops the clock there: the due time
    is then ``start`` plus ``after`` of wall time, so a message never waits for ever."""
    if schedule is None:
        return start + after
    at, left = start, after
    for _ in range(_STRETCHES):
        # in UTC: the difference of two times of one zone is their wall times' (PEP 495)
        if (opens := schedule.next_opening(at)) is None:
            break
        opens = opens.astimezone(UTC)
        if (closes := schedule.open_until(opens)) is None or closes - opens >= left:
            return opens + left
        left -= closes.astimezone(UTC) - opens
        at = closes.astimezone(UTC)
    return start + after
