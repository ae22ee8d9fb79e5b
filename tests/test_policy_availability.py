"""Routing that knows who is working (issue 15), rule by rule: every new branch of the pure
policy as a row of (facts, message, instant) -> (kind, target, reason, for_agent, opens_at)
and the step of the rule that decided, as ``route explain`` prints it.

Calendars are real ``Schedule``s: a team in America/New_York either side of its 2026 clock
changes (8 March, 1 November) beside one in Europe/Istanbul, which has none; a range over
midnight; Kurban Bayramı 2026 (27-30 May, its arife 26 May a half day closing at 13:00, as
tests/test_schedule.py checked against the holidays package)."""

from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta

import pytest

from ingest.schema import Channel, Identity, IdentityKindField, InboundMessage, Thread
from routers.availability import AgentFacts, agent_schedule
from routers.directory import AgentRecord, CustomerRecord, TeamRecord
from routers.policy import CHAIN, Facts, TeamFacts, decide, trace
from routers.schedule import Schedule, WeeklyHours, parse_timezone
from routers.settings import RoutingSettings

IST = parse_timezone("Europe/Istanbul")
OFFICE = "Mon-Fri 09:00-18:00"


def at(text: str) -> datetime:
    """An instant written with its offset, e.g. ``2026-05-04T10:00+03:00``."""
    instant = datetime.fromisoformat(text)
    assert instant.utcoffset() is not None
    return instant


def team(
    tid: str,
    zone: str | None = None,
    hours: str | None = None,
    *,
    country: str | None = None,
    after_hours: str | None = None,
) -> TeamFacts:
    """A team and its calendar as the decider would build it (no hours: always open)."""
    record = TeamRecord(
        id=tid,
        name=tid.title(),
        dial=None,
        email=None,
        timezone=zone,
        hours=hours,
        holidays=country,
        after_hours=after_hours,
    )
    if hours is None:
        return TeamFacts(record)
    return TeamFacts(
        record, Schedule(parse_timezone(zone or "UTC"), WeeklyHours.parse(hours), country)
    )


# billing (Istanbul, TR holidays) hands over to oncall (always open); sales (Istanbul, TR
# holidays) to night (Fri 22:00-02:00, over midnight), which would hand over to oncall but
# never does (no chains); us (New York) has nobody after hours; of two address teams,
# support names an after-hours team missing from the directory, hotline names oncall.
TEAMS = {
    t.record.id: t
    for t in (
        team("billing", "Europe/Istanbul", OFFICE, country="TR", after_hours="oncall"),
        team("oncall"),
        team("sales", "Europe/Istanbul", OFFICE, country="TR", after_hours="night"),
        team("night", "Europe/Istanbul", "Fri 22:00-02:00", after_hours="oncall"),
        team("us", "America/New_York", "Mon-Fri 09:00-17:00"),
        team("support", "Europe/Istanbul", OFFICE, after_hours="ghost"),
        team("hotline", "Europe/Istanbul", OFFICE, after_hours="oncall"),
        team("frontdesk", "Europe/Istanbul", OFFICE),
    )
}
BILLING_HOURS = TEAMS["billing"].schedule

ACME = CustomerRecord(id="acme", name="Acme", team_id="billing")
SALES = CustomerRecord(id="initech", name="Initech", team_id="sales")
YANKEE = CustomerRecord(id="yankee", name="Yankee Corp", team_id="us")

# A working Monday in Istanbul, nowhere near a holiday or a clock change.
MONDAY = at("2026-05-04T15:00+03:00")
EARLIER = MONDAY - timedelta(hours=2)

ANA = AgentFacts(id="ana", team_id="billing", active=True, presence="available")
BOB = AgentFacts(id="bob", team_id="billing", active=True, presence="available")
CEM = AgentFacts(id="cem", team_id="billing", active=True, presence="available")
AWAY_WITH_BOB = replace(ANA, presence="away", deputy=BOB)
MORNINGS = Schedule(IST, WeeklyHours.parse("Mon-Fri 09:00-13:00"))


def email(*, to: str | None = None, reply: bool = False) -> InboundMessage:
    return _message("email", "email", "ayse@acme.test", to=to, reply=reply)


def sms() -> InboundMessage:
    return _message("sms", "phone", "+905321112233")


def voice() -> InboundMessage:
    return _message("voice", "phone", "+905321112233")


def _message(
    channel: Channel,
    kind: IdentityKindField,
    sender: str,
    *,
    to: str | None = None,
    reply: bool = False,
) -> InboundMessage:
    return InboundMessage(
        channel=channel,
        external_id="x",
        sender=Identity(kind=kind, address=sender),
        recipient=Identity(kind=kind, address=to) if to else None,
        thread=Thread(in_reply_to="<ours@omniroute.test>") if reply else None,
    )


def last(agent: AgentFacts, customer: CustomerRecord = ACME, answered: datetime = EARLIER) -> Facts:
    """``agent`` answered ``customer`` (two hours before MONDAY unless ``answered``)."""
    return Facts(customer, last_agent=agent, last_agent_at=answered, teams=TEAMS)


def of(customer: CustomerRecord | None) -> Facts:
    return Facts(customer, teams=TEAMS)


S_ADDRESS = RoutingSettings(
    address_teams={"help@support.example": "support", "call@support.example": "hotline"},
)


@dataclass(frozen=True)
class Row:
    facts: Facts
    message: InboundMessage
    now: datetime
    #: kind, target, reason, for_agent, opens_at (ISO text with the team's offset)
    expected: tuple[str, str | None, str, str | None, str | None]
    #: the steps that must appear; the last is the step of the rule that decided
    steps: tuple[str, ...]
    settings: RoutingSettings = field(default_factory=RoutingSettings)


CASES: dict[str, Row] = {
    # -- DST: New York moves its clocks on 2026-03-08 and 2026-11-01, Istanbul never. The
    # same UTC instant of a Monday is before opening in one week and open in the next.
    "new york before the spring change: 13:30Z is 08:30 EST, waits for 09:00 EST": Row(
        of(YANKEE),
        email(),
        at("2026-03-02T13:30Z"),
        ("team", "us", "dedicated_team", None, "2026-03-02T09:00:00-05:00"),
        (
            "dedicated_team: us; team us closed: Mon 08:30 America/New_York, opens 09:00; "
            "no after-hours team, it waits there",
        ),
    ),
    "new york after the spring change: 13:30Z is 09:30 EDT, open": Row(
        of(YANKEE),
        email(),
        at("2026-03-09T13:30Z"),
        ("team", "us", "dedicated_team", None, None),
        ("dedicated_team: us",),
    ),
    "new york closed over the spring change: opens Monday 09:00 EDT": Row(
        of(YANKEE),
        email(),
        at("2026-03-06T23:00Z"),
        ("team", "us", "dedicated_team", None, "2026-03-09T09:00:00-04:00"),
        (
            "dedicated_team: us; team us closed: Fri 18:00 America/New_York, opens Mon 09:00; "
            "no after-hours team, it waits there",
        ),
    ),
    "new york before the autumn change: 21:30Z is 17:30 EDT, closed": Row(
        of(YANKEE),
        email(),
        at("2026-10-26T21:30Z"),
        ("team", "us", "dedicated_team", None, "2026-10-27T09:00:00-04:00"),
        (
            "dedicated_team: us; team us closed: Mon 17:30 America/New_York, opens Tue 09:00; "
            "no after-hours team, it waits there",
        ),
    ),
    "new york after the autumn change: 21:30Z is 16:30 EST, open": Row(
        of(YANKEE),
        email(),
        at("2026-11-02T21:30Z"),
        ("team", "us", "dedicated_team", None, None),
        ("dedicated_team: us",),
    ),
    "new york closed over the autumn change: opens Monday 09:00 EST": Row(
        of(YANKEE),
        email(),
        at("2026-10-30T22:00Z"),
        ("team", "us", "dedicated_team", None, "2026-11-02T09:00:00-05:00"),
        (
            "dedicated_team: us; team us closed: Fri 18:00 America/New_York, opens Mon 09:00; "
            "no after-hours team, it waits there",
        ),
    ),
    "new york on the repeated hour of 1 November: a Sunday, waits for Monday": Row(
        of(YANKEE),
        email(),
        at("2026-11-01T05:30Z"),
        ("team", "us", "dedicated_team", None, "2026-11-02T09:00:00-05:00"),
        (
            "dedicated_team: us; team us closed: Sun 01:30 America/New_York, opens Mon 09:00; "
            "no after-hours team, it waits there",
        ),
    ),
    "istanbul the week before the US change: 06:30Z is 09:30, open": Row(
        of(SALES),
        email(),
        at("2026-03-02T06:30Z"),
        ("team", "sales", "dedicated_team", None, None),
        ("dedicated_team: sales",),
    ),
    "istanbul the week after the US change: 06:30Z is still 09:30, open": Row(
        of(SALES),
        email(),
        at("2026-03-09T06:30Z"),
        ("team", "sales", "dedicated_team", None, None),
        ("dedicated_team: sales",),
    ),
    "istanbul the week after the US autumn change: 05:30Z is still 08:30, closed": Row(
        of(CustomerRecord(id="c", name="C", team_id="frontdesk")),
        email(),
        at("2026-11-02T05:30Z"),
        ("team", "frontdesk", "dedicated_team", None, "2026-11-02T09:00:00+03:00"),
        (
            "dedicated_team: frontdesk; team frontdesk closed: Mon 08:30 Europe/Istanbul, "
            "opens 09:00; no after-hours team, it waits there",
        ),
    ),
    # -- a closed team with an after-hours team, and a range over midnight
    "closed team hands over to its open after-hours team": Row(
        of(ACME),
        email(),
        at("2026-05-04T19:00+03:00"),
        ("team", "oncall", "after_hours", None, None),
        (
            "dedicated_team: billing; team billing closed: Mon 19:00 Europe/Istanbul, opens "
            "Tue 09:00; after-hours team oncall takes it",
        ),
    ),
    "after-hours team open before midnight (Fri 22:00-02:00)": Row(
        of(SALES),
        email(),
        at("2026-05-08T23:30+03:00"),
        ("team", "night", "after_hours", None, None),
        (
            "dedicated_team: sales; team sales closed: Fri 23:30 Europe/Istanbul, opens Mon "
            "09:00; after-hours team night takes it",
        ),
    ),
    "after-hours team still open after midnight: Friday's range runs into Saturday": Row(
        of(SALES),
        email(),
        at("2026-05-09T01:59+03:00"),
        ("team", "night", "after_hours", None, None),
        (
            "dedicated_team: sales; team sales closed: Sat 01:59 Europe/Istanbul, opens Mon "
            "09:00; after-hours team night takes it",
        ),
    ),
    "after-hours team closed too at 02:00: waits with the team, no chain to oncall": Row(
        of(SALES),
        email(),
        at("2026-05-09T02:00+03:00"),
        ("team", "sales", "dedicated_team", None, "2026-05-11T09:00:00+03:00"),
        (
            "dedicated_team: sales; team sales closed: Sat 02:00 Europe/Istanbul, opens Mon "
            "09:00; after-hours team night is closed too, it waits there",
        ),
    ),
    "after-hours team closed on a Thursday night: Friday-only range": Row(
        of(SALES),
        email(),
        at("2026-05-07T23:30+03:00"),
        ("team", "sales", "dedicated_team", None, "2026-05-08T09:00:00+03:00"),
        (
            "dedicated_team: sales; team sales closed: Thu 23:30 Europe/Istanbul, opens Fri "
            "09:00; after-hours team night is closed too, it waits there",
        ),
    ),
    # -- holidays: TR's Kurban Bayramı 2026 and its half-day arife
    "arife before 13:00: the team works the morning": Row(
        of(ACME),
        email(),
        at("2026-05-26T12:59+03:00"),
        ("team", "billing", "dedicated_team", None, None),
        ("dedicated_team: billing",),
    ),
    "arife from 13:00: holiday, the after-hours team takes it": Row(
        of(ACME),
        email(),
        at("2026-05-26T13:00+03:00"),
        ("team", "oncall", "holiday", None, None),
        (
            "dedicated_team: billing; team billing holiday Kurban Bayramı (saat 13.00'ten): "
            "Tue 13:00 Europe/Istanbul, opens Mon 09:00; after-hours team oncall takes it",
        ),
    ),
    "public holiday on a working day: reason holiday via the after-hours team": Row(
        of(ACME),
        email(),
        at("2026-05-27T10:00+03:00"),
        ("team", "oncall", "holiday", None, None),
        (
            "dedicated_team: billing; team billing holiday Kurban Bayramı: Wed 10:00 "
            "Europe/Istanbul, opens Mon 09:00; after-hours team oncall takes it",
        ),
    ),
    "holiday on a Saturday: closed anyway, reason after_hours": Row(
        of(ACME),
        email(),
        at("2026-05-30T11:00+03:00"),
        ("team", "oncall", "after_hours", None, None),
        (
            "dedicated_team: billing; team billing closed (Kurban Bayramı): Sat 11:00 "
            "Europe/Istanbul, opens Mon 09:00; after-hours team oncall takes it",
        ),
    ),
    "public holiday, after-hours team closed: waits until after the Bayram": Row(
        of(SALES),
        email(),
        at("2026-05-27T10:00+03:00"),
        ("team", "sales", "dedicated_team", None, "2026-06-01T09:00:00+03:00"),
        (
            "dedicated_team: sales; team sales holiday Kurban Bayramı: Wed 10:00 "
            "Europe/Istanbul, opens Mon 09:00; after-hours team night is closed too, it "
            "waits there",
        ),
    ),
    # -- a message routed by address, or to the default team, while that team is closed
    "unknown sender, address team closed: its after-hours team is missing, it waits": Row(
        of(None),
        email(to="help@support.example"),
        at("2026-05-04T20:00+03:00"),
        ("team", "support", "unknown_sender", None, "2026-05-05T09:00:00+03:00"),
        (
            "address: help@support.example belongs to team support; team support closed: Mon "
            "20:00 Europe/Istanbul, opens Tue 09:00; after-hours team ghost is not in the "
            "directory, it waits there",
        ),
        S_ADDRESS,
    ),
    "unknown sender, address team closed: after hours": Row(
        of(None),
        email(to="call@support.example"),
        at("2026-05-04T20:00+03:00"),
        ("team", "oncall", "after_hours", None, None),
        (
            "address: call@support.example belongs to team hotline; team hotline closed: Mon "
            "20:00 Europe/Istanbul, opens Tue 09:00; after-hours team oncall takes it",
        ),
        S_ADDRESS,
    ),
    "unknown sender, address team open": Row(
        of(None),
        email(to="help@support.example"),
        MONDAY,
        ("team", "support", "unknown_sender", None, None),
        ("address: help@support.example belongs to team support",),
        S_ADDRESS,
    ),
    "unknown sender, default team closed without an after-hours team": Row(
        of(None),
        email(),
        at("2026-05-09T10:00+03:00"),
        ("team", "frontdesk", "unknown_sender", None, "2026-05-11T09:00:00+03:00"),
        (
            "address: no address arrived with it",
            "default_team: frontdesk; team frontdesk closed: Sat 10:00 Europe/Istanbul, "
            "opens Mon 09:00; no after-hours team, it waits there",
        ),
        RoutingSettings(default_team="frontdesk"),
    ),
    "voice to a closed team waits there with opens_at": Row(
        of(YANKEE),
        voice(),
        at("2026-05-09T15:00Z"),
        ("team", "us", "dedicated_team", None, "2026-05-11T09:00:00-04:00"),
        (
            "dedicated_team: us; team us closed: Sat 11:00 America/New_York, opens Mon 09:00; "
            "no after-hours team, it waits there",
        ),
    ),
    # -- out of office: until, deputies (one level, never the deputy's deputy)
    "last agent away, deputy available: the deputy, for the agent": Row(
        last(AWAY_WITH_BOB),
        email(),
        MONDAY,
        ("agent", "bob", "deputy", "ana", None),
        ("last_agent: ana is away; deputy bob stands in",),
    ),
    "thread owner away, deputy available: the deputy, for the owner": Row(
        Facts(ACME, thread_owner=AWAY_WITH_BOB, teams=TEAMS),
        email(reply=True),
        MONDAY,
        ("agent", "bob", "deputy", "ana", None),
        ("thread_owner: ana is away; deputy bob stands in",),
    ),
    "last agent offline until a future time, deputy available": Row(
        last(replace(ANA, presence="offline", until=at("2026-05-18T09:00+03:00"), deputy=BOB)),
        sms(),
        MONDAY,
        ("agent", "bob", "deputy", "ana", None),
        ("last_agent: ana is offline until 2026-05-18T09:00+03:00; deputy bob stands in",),
    ),
    "deputy away themself: no chain to the deputy's deputy, the team": Row(
        last(replace(ANA, presence="away", deputy=replace(BOB, presence="away", deputy=CEM))),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        (
            "last_agent: ana is away; deputy bob is away, not taken",
            "dedicated_team: billing",
        ),
    ),
    "deputy at capacity: the team, as a fallback (not busy: the agent is away)": Row(
        last(replace(ANA, presence="away", deputy=replace(BOB, load=2, capacity=2))),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        (
            "last_agent: ana is away; deputy bob is at capacity (2 of 2 open), not taken",
            "dedicated_team: billing",
        ),
    ),
    "deputy deactivated: the team": Row(
        last(replace(ANA, presence="away", deputy=replace(BOB, active=False))),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        (
            "last_agent: ana is away; deputy bob is deactivated, not taken",
            "dedicated_team: billing",
        ),
    ),
    "deputy off work by their own hours: the team": Row(
        last(replace(ANA, presence="away", deputy=replace(BOB, schedule=MORNINGS))),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        (
            "last_agent: ana is away; deputy bob is off work (closed: Mon 15:00 "
            "Europe/Istanbul, opens Tue 09:00), not taken",
            "dedicated_team: billing",
        ),
    ),
    "deactivated agent's deputy is not asked": Row(
        last(replace(ANA, active=False, deputy=BOB)),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        ("last_agent: ana is deactivated, not taken", "dedicated_team: billing"),
    ),
    "away without a deputy: the team, as before": Row(
        last(replace(ANA, presence="away", until=at("2026-05-18T09:00+03:00"))),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        (
            "last_agent: ana is away until 2026-05-18T09:00+03:00, not taken",
            "dedicated_team: billing",
        ),
    ),
    "until in the past: back at work, the agent again": Row(
        last(replace(ANA, presence="away", until=MONDAY - timedelta(minutes=1), deputy=BOB)),
        email(),
        MONDAY,
        ("agent", "ana", "last_agent", None, None),
        (f"last_agent: ana answered at {EARLIER.isoformat()}",),
    ),
    "until exactly now: back at work": Row(
        last(replace(ANA, presence="offline", until=MONDAY)),
        email(),
        MONDAY,
        ("agent", "ana", "last_agent", None, None),
        (f"last_agent: ana answered at {EARLIER.isoformat()}",),
    ),
    "until in the past but outside own hours: still not at work": Row(
        last(replace(ANA, presence="away", until=MONDAY - timedelta(days=1), schedule=MORNINGS)),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        (
            "last_agent: ana is off work (closed: Mon 15:00 Europe/Istanbul, opens Tue 09:00), "
            "not taken",
            "dedicated_team: billing",
        ),
    ),
    # -- agent hours: outside them is like away
    "agent outside own hours, no deputy: the team": Row(
        last(replace(ANA, schedule=MORNINGS)),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_fallback", None, None),
        (
            "last_agent: ana is off work (closed: Mon 15:00 Europe/Istanbul, opens Tue 09:00), "
            "not taken",
            "dedicated_team: billing",
        ),
    ),
    "agent outside own hours, deputy working: the deputy": Row(
        last(replace(ANA, schedule=MORNINGS, deputy=replace(BOB, schedule=BILLING_HOURS))),
        email(),
        MONDAY,
        ("agent", "bob", "deputy", "ana", None),
        (
            "last_agent: ana is off work (closed: Mon 15:00 Europe/Istanbul, opens Tue 09:00); "
            "deputy bob stands in",
        ),
    ),
    "agent inside own hours": Row(
        last(replace(ANA, schedule=MORNINGS)),
        email(),
        at("2026-05-04T12:59+03:00"),
        ("agent", "ana", "last_agent", None, None),
        (f"last_agent: ana answered at {EARLIER.isoformat()}",),
    ),
    "agent off work with the team at night: the after-hours team takes it": Row(
        last(replace(ANA, schedule=BILLING_HOURS)),
        email(),
        at("2026-05-04T22:00+03:00"),
        ("team", "oncall", "after_hours", None, None),
        (
            "last_agent: ana is off work (closed: Mon 22:00 Europe/Istanbul, opens Tue 09:00), "
            "not taken",
            "dedicated_team: billing; team billing closed: Mon 22:00 Europe/Istanbul, opens "
            "Tue 09:00; after-hours team oncall takes it",
        ),
    ),
    "agent off work for the holiday, team closed, no after-hours: waits with opens_at": Row(
        last(
            replace(ANA, team_id="sales", schedule=TEAMS["sales"].schedule),
            SALES,
            at("2026-05-25T16:00+03:00"),
        ),
        email(),
        at("2026-05-26T14:00+03:00"),
        ("team", "sales", "last_agent_fallback", None, "2026-06-01T09:00:00+03:00"),
        (
            "last_agent: ana is off work (holiday Kurban Bayramı (saat 13.00'ten): Tue 14:00 "
            "Europe/Istanbul, opens Mon 09:00), not taken",
            "dedicated_team: sales; team sales holiday Kurban Bayramı (saat 13.00'ten): Tue "
            "14:00 Europe/Istanbul, opens Mon 09:00; after-hours team night is closed too, it "
            "waits there",
        ),
    ),
    # -- capacity on the message's channel (the decider gives that channel's load)
    "last agent at capacity: last_agent_busy": Row(
        last(replace(ANA, load=3, capacity=3)),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_busy", None, None),
        ("last_agent: ana is at capacity (3 of 3 open), not taken", "dedicated_team: billing"),
    ),
    "last agent over capacity (lowered meanwhile): last_agent_busy": Row(
        last(replace(ANA, load=7, capacity=5)),
        sms(),
        MONDAY,
        ("team", "billing", "last_agent_busy", None, None),
        ("last_agent: ana is at capacity (7 of 5 open), not taken", "dedicated_team: billing"),
    ),
    "capacity 0 on the channel: takes nothing there": Row(
        last(replace(ANA, load=0, capacity=0)),
        sms(),
        MONDAY,
        ("team", "billing", "last_agent_busy", None, None),
        ("last_agent: ana is at capacity (0 of 0 open), not taken", "dedicated_team: billing"),
    ),
    "last agent one below capacity: the agent": Row(
        last(replace(ANA, load=2, capacity=3)),
        email(),
        MONDAY,
        ("agent", "ana", "last_agent", None, None),
        (f"last_agent: ana answered at {EARLIER.isoformat()}",),
    ),
    "no capacity on the message's channel: unlimited, whatever the load": Row(
        last(replace(ANA, load=500, capacity=None)),
        sms(),
        MONDAY,
        ("agent", "ana", "last_agent", None, None),
        (f"last_agent: ana answered at {EARLIER.isoformat()}",),
    ),
    "thread owner at capacity: thread_owner_busy": Row(
        Facts(ACME, thread_owner=replace(ANA, load=2, capacity=2), teams=TEAMS),
        email(reply=True),
        MONDAY,
        ("team", "billing", "thread_owner_busy", None, None),
        ("thread_owner: ana is at capacity (2 of 2 open), not taken", "dedicated_team: billing"),
    ),
    "thread owner busy, last agent available: the last agent": Row(
        Facts(
            ACME,
            thread_owner=replace(ANA, load=2, capacity=2),
            last_agent=BOB,
            last_agent_at=EARLIER,
            teams=TEAMS,
        ),
        email(reply=True),
        MONDAY,
        ("agent", "bob", "last_agent", None, None),
        (
            "thread_owner: ana is at capacity (2 of 2 open), not taken",
            f"last_agent: bob answered at {EARLIER.isoformat()}",
        ),
    ),
    "thread owner busy, last agent away: the owner's reason wins": Row(
        Facts(
            ACME,
            thread_owner=replace(ANA, load=2, capacity=2),
            last_agent=replace(BOB, presence="away"),
            last_agent_at=EARLIER,
            teams=TEAMS,
        ),
        email(reply=True),
        MONDAY,
        ("team", "billing", "thread_owner_busy", None, None),
        ("last_agent: bob is away, not taken", "dedicated_team: billing"),
    ),
    "at capacity with a deputy: busy is not away, the deputy is not asked": Row(
        last(replace(ANA, load=3, capacity=3, deputy=BOB)),
        email(),
        MONDAY,
        ("team", "billing", "last_agent_busy", None, None),
        ("last_agent: ana is at capacity (3 of 3 open), not taken", "dedicated_team: billing"),
    ),
    "at capacity at night: the after-hours team, its steps say busy": Row(
        last(replace(ANA, load=3, capacity=3)),
        email(),
        at("2026-05-04T20:00+03:00"),
        ("team", "oncall", "after_hours", None, None),
        (
            "last_agent: ana is at capacity (3 of 3 open), not taken",
            "dedicated_team: billing; team billing closed: Mon 20:00 Europe/Istanbul, opens "
            "Tue 09:00; after-hours team oncall takes it",
        ),
    ),
}


@pytest.mark.parametrize(("row"), [pytest.param(row, id=name) for name, row in CASES.items()])
def test_availability_table(row: Row) -> None:
    """Each new branch of the chain gives its route, and its step says why, with the clock."""
    route = decide(row.message, row.facts, row.settings, row.now)
    opens = route.opens_at.isoformat() if route.opens_at else None
    got = (route.kind, route.target, route.reason, route.for_agent, opens)
    assert got == row.expected, route.steps
    *earlier, deciding = row.steps
    assert route.steps[-1] == deciding
    for step in earlier:
        assert step in route.steps
    ran = [step.partition(": ")[0] for step in route.steps]
    assert ran == [rule.__name__ for rule in CHAIN][: len(ran)], "one step per rule, in order"
    team_id = row.facts.customer.team_id if row.facts.customer else None
    assert route.fallback_team == (team_id if route.kind == "agent" else None)


def test_every_new_reason_has_rows() -> None:
    """A reason of issue 15 without a row here is a branch nobody checked."""
    reasons = {row.expected[2] for row in CASES.values()}
    new = {
        "deputy",
        "after_hours",
        "holiday",
        "last_agent_busy",
        "thread_owner_busy",
        "last_agent_fallback",
    }
    assert new <= reasons


def test_opens_at_is_in_the_teams_zone() -> None:
    """route.opens_at is the team's wall clock (its offset), not UTC, on both sides of DST."""
    for name, row in CASES.items():
        route = decide(row.message, row.facts, row.settings, row.now)
        if route.opens_at is None:
            continue
        decided = row.facts.teams[route.target or ""].schedule
        assert decided is not None, name
        assert (
            route.opens_at.utcoffset() == route.opens_at.astimezone(decided.timezone).utcoffset()
        ), name
        assert decided.status(route.opens_at).open, f"{name}: opens_at is not an open instant"
        assert not decided.status(route.opens_at - timedelta(seconds=1)).open, name


def test_trace_names_the_rule_that_handed_over() -> None:
    """route explain: the deciding link is the team rule, with the after-hours step."""
    row = CASES["public holiday on a working day: reason holiday via the after-hours team"]
    links = trace(decide(row.message, row.facts, row.settings, row.now))
    decided = [link for link in links if link.outcome == "decided"]
    assert [(link.rule, link.step) for link in decided] == [
        ("dedicated_team", row.steps[-1].partition(": ")[2])
    ]


def test_a_deputy_route_is_dialled_with_the_customers_team_as_fallback() -> None:
    """A deputy's voice route falls back to the customer's team, like the agent's would."""
    route = decide(voice(), last(AWAY_WITH_BOB), RoutingSettings(sticky_channels=["voice"]), MONDAY)
    assert (route.kind, route.target, route.reason, route.for_agent) == (
        "agent",
        "bob",
        "deputy",
        "ana",
    )
    assert route.fallback_team == "billing"


def test_a_team_half_day_counts_for_an_agent_only_where_it_meets_their_own_hours() -> None:
    """John works 13:00-22:00; the team's half day on 31 December is 09:00-13:00: he is off
    all that day, not at work in the morning; Ana, on the team's hours, works the morning."""
    team = TeamRecord(
        "billing",
        "Billing",
        None,
        None,
        timezone="Europe/Istanbul",
        hours="Mon-Fri 09:00-18:00",
        company_days=((date(2026, 12, 31), "Yılbaşı arifesi", "09:00-13:00"),),
    )
    john = AgentRecord("john", "John", "billing", None, True, hours="Mon-Fri 13:00-22:00")
    ana = AgentRecord("ana", "Ana", "billing", None, True)
    noon = datetime(2026, 12, 31, 12, 0, tzinfo=IST)
    evening = datetime(2026, 12, 31, 15, 0, tzinfo=IST)
    johns, anas = agent_schedule(john, team, "UTC"), agent_schedule(ana, team, "UTC")
    assert johns is not None
    assert anas is not None
    assert not johns.status(noon).open
    assert not johns.status(evening).open
    assert anas.status(noon).open
    assert not anas.status(evening).open
    assert johns.status(datetime(2026, 12, 30, 15, 0, tzinfo=IST)).open
