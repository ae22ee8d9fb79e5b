"""Who is working, read from a real directory (issue 15): the ``DirectoryDecider`` on SQLite
and PostgreSQL, with loads written by the router's own claim (``routed_log``) and freed by
the routing state's own writers (``state.record_reply``, ``state.close_assignment``), and
presence with ``until`` and a deputy stored by ``state.set_presence``.

The decider's clock is the test's: loads age out of ``routing.load_window``, an ``until``
passes, a team closes, without sleeping."""

import asyncio
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.protocols import Decision
from ingest.schema import Channel, Identity, IdentityKindField, InboundMessage, RoutedMessage
from routers import capacity, state
from routers.decider import DirectoryDecider
from routers.models import (
    Agent,
    Assignment,
    CompanyHoliday,
    Customer,
    CustomerIdentity,
    Team,
)
from routers.settings import RoutingSettings
from routers.store.engine import create_engine, sessionmaker
from routers.store.transactions import transactions_of
from routers.store.values import utc

# A working Monday in Istanbul; the Saturday after it; billing works Mon-Fri 09:00-18:00.
MONDAY = datetime.fromisoformat("2026-05-04T11:00+03:00")
SATURDAY = datetime.fromisoformat("2026-05-09T11:00+03:00")
OFFICE = "Mon-Fri 09:00-18:00"
SETTINGS = RoutingSettings(default_region="TR", timezone="Europe/Istanbul")

ACME_MAIL, ACME_PHONE = "ayse@acme.test", "+905321112233"
GLOBEX_PHONE, LABCO_PHONE, FUN_MAIL = "+905329998877", "+905551112233", "hi@fun.test"


async def seed_directory(engine: AsyncEngine) -> None:
    """Teams with calendars and after-hours teams, agents with capacity, a deputy and own
    hours, customers of each team: the rows the CSV import writes."""
    async with sessionmaker(engine).begin() as session:
        session.add_all(
            [
                Team(
                    id="billing",
                    name="Billing",
                    dial="+902125550100",
                    email=None,
                    timezone="Europe/Istanbul",
                    hours=OFFICE,
                    holidays="TR",
                    after_hours="oncall",
                    after_hours_dial="sip:billing-closed@pbx.test",
                ),
                Team(id="oncall", name="On call", dial="sip:oncall@pbx.test", email=None),
                Team(
                    id="network",
                    name="Network",
                    dial="sip:network@pbx.test",
                    email=None,
                    timezone="Europe/Istanbul",
                    hours=OFFICE,
                    after_hours_dial="sip:network-closed@pbx.test",
                ),
                Team(
                    id="lab",
                    name="Lab",
                    dial="sip:lab@pbx.test",
                    email=None,
                    timezone="Europe/Istanbul",
                    hours="closed",
                    after_hours_dial="sip:lab-closed@pbx.test",
                ),
                # around the clock in routing.timezone, but for its own company day
                Team(
                    id="fun", name="Fun", dial="sip:fun@pbx.test", email=None, after_hours="oncall"
                ),
            ]
        )
        await session.flush()
        session.add(CompanyHoliday(team_id="fun", day=date(2026, 5, 4), name="Şirket pikniği"))
        session.add_all(
            [
                Agent(
                    id="ana",
                    name="Ana",
                    team_id="billing",
                    dial="client:ana",
                    active=True,
                    deputy="cem",
                    capacity="email=2;sms=1",
                ),
                Agent(
                    id="bob",
                    name="Bob",
                    team_id="billing",
                    dial="client:bob",
                    active=True,
                    capacity="email=1",
                ),
                Agent(id="cem", name="Cem", team_id="billing", dial="client:cem", active=True),
                Agent(
                    id="dora",
                    name="Dora",
                    team_id="billing",
                    dial="client:dora",
                    active=True,
                    hours="Mon-Fri 09:00-13:00",
                ),
                Customer(id="acme", name="Acme", team_id="billing"),
                Customer(id="globex", name="Globex", team_id="network"),
                Customer(id="labco", name="Labco", team_id="lab"),
                Customer(id="funco", name="Funco", team_id="fun"),
            ]
        )
        await session.flush()
        session.add_all(
            [
                CustomerIdentity(kind="email", address=ACME_MAIL, customer_id="acme"),
                CustomerIdentity(kind="phone", address=ACME_PHONE, customer_id="acme"),
                CustomerIdentity(kind="phone", address=GLOBEX_PHONE, customer_id="globex"),
                CustomerIdentity(kind="phone", address=LABCO_PHONE, customer_id="labco"),
                CustomerIdentity(kind="email", address=FUN_MAIL, customer_id="funco"),
            ]
        )


class Clock:
    """The decider's clock, moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta) -> None:
        self.now += by


@dataclass
class Desk:
    """The real decider and the router's claim on one directory: what a router worker does
    with a batch, without the broker."""

    engine: AsyncEngine
    clock: Clock
    settings: RoutingSettings = field(default_factory=lambda: SETTINGS)

    def __post_init__(self) -> None:
        self.decider = DirectoryDecider(self.engine, self.settings, clock=self.clock)
        self.sessions = sessionmaker(self.engine)
        self._run = transactions_of(self.engine)
        self._sent = 0

    async def route(self, *messages: InboundMessage) -> list[Decision]:
        """Decide a batch together and claim it, which writes the agents' assignments."""
        decisions = await self.decider.decide_many(list(messages))
        routed = [
            RoutedMessage(message=m, customer=d.customer, route=d.route)
            for m, d in zip(messages, decisions, strict=True)
        ]
        claimed = await self.claim(routed)
        return [replace(d, route=r.route) for d, r in zip(decisions, claimed, strict=True)]

    async def claim(self, routed: list[RoutedMessage]) -> list[RoutedMessage]:
        """The router's claim: the capacity checked again, the record and assignments written;
        the routed messages as recorded."""
        since = self.clock.now - self.settings.load_window
        claims = await self._run(lambda connection: capacity.claim(connection, routed, since))
        return [item for _, item in claims]

    async def where(self, *messages: InboundMessage) -> list[tuple[str, str]]:
        """(routing key, reason) of each message, routed as one batch."""
        return [(d.route.routing_key, d.route.reason) for d in await self.route(*messages)]

    def message(
        self, channel: Channel = "email", sender: str = ACME_MAIL, kind: IdentityKindField = "email"
    ) -> InboundMessage:
        self._sent += 1
        return InboundMessage(
            channel=channel,
            external_id=f"ext-{self._sent}",
            sender=Identity(kind=kind, address=sender),
            received_at=self.clock.now,
        )

    def email(self) -> InboundMessage:
        return self.message()

    def sms(self) -> InboundMessage:
        return self.message("sms", ACME_PHONE, "phone")

    async def replied(
        self, agent_id: str, customer_id: str | None = "acme", answers: str | None = None
    ) -> None:
        """An ``agent.replied`` as the events worker stores it; with ``answers``, a reply to
        that message as the dispatcher stores it."""
        async with self.sessions.begin() as session:
            await state.record_reply(
                session,
                agent_id=agent_id,
                customer_id=customer_id,
                channel="email",
                at=self.clock.now,
                answers=answers,
            )

    async def presence(
        self,
        agent_id: str,
        status: str,
        *,
        until: datetime | None = None,
        deputy: str | None = None,
    ) -> None:
        async with self.sessions.begin() as session:
            await state.set_presence(
                session, agent_id, status, self.clock.now, until=until, deputy=deputy
            )

    async def open_load(self, agent_id: str) -> int:
        """Open assignments of the agent, as stored."""
        async with self.sessions() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(Assignment)
                .where(Assignment.agent_id == agent_id, Assignment.closed_at.is_(None))
            )
        return int(count or 0)


@pytest.fixture
async def desk(db: AsyncEngine) -> Desk:
    """Ana last answered Acme an hour before MONDAY; the clock stands at MONDAY 11:00."""
    await seed_directory(db)
    clock = Clock(MONDAY - timedelta(hours=1))
    d = Desk(db, clock)
    await d.replied("ana")
    clock.advance(timedelta(hours=1))
    return d


ANA = ("agent.ana", "last_agent")
BUSY = ("team.billing", "last_agent_busy")


async def test_capacity_reached_then_freed_by_a_reply(desk: Desk) -> None:
    """Email capacity 2: two go to Ana, the third to the team; her reply frees her."""
    assert await desk.where(desk.email()) == [ANA]
    desk.clock.advance(timedelta(minutes=1))
    assert await desk.where(desk.email()) == [ANA]
    desk.clock.advance(timedelta(minutes=1))
    decision = (await desk.route(desk.email()))[0]
    assert (decision.route.routing_key, decision.route.reason) == BUSY
    assert "last_agent: ana is at capacity (2 of 2 open), not taken" in decision.route.steps
    assert await desk.open_load("ana") == 2, "a message to the team is no load of hers"

    desk.clock.advance(timedelta(minutes=1))
    await desk.replied("ana")
    assert await desk.open_load("ana") == 0
    desk.clock.advance(timedelta(minutes=1))
    assert await desk.where(desk.email(), desk.email(), desk.email()) == [ANA, ANA, BUSY]


async def test_a_reply_to_another_customer_frees_nothing(desk: Desk) -> None:
    """The load is per customer answered: Ana answering Globex leaves Acme's waiting."""
    assert await desk.where(desk.email(), desk.email()) == [ANA, ANA]
    desk.clock.advance(timedelta(minutes=1))
    await desk.replied("ana", "globex")
    assert await desk.open_load("ana") == 2
    assert await desk.where(desk.email()) == [BUSY]


async def test_assignment_closed_takes_one_off(desk: Desk) -> None:
    """An ``assignment.closed`` frees exactly that message, once, and only for its agent."""
    first, second = desk.email(), desk.email()
    assert await desk.where(first, second) == [ANA, ANA]
    async with desk.sessions.begin() as session:
        assert not await state.close_assignment(session, first.id, "bob", desk.clock.now)
        assert not await state.close_assignment(session, "no-such-message", "ana", desk.clock.now)
    assert await desk.where(desk.email()) == [BUSY]

    async with desk.sessions.begin() as session:
        assert await state.close_assignment(session, first.id, "ana", desk.clock.now)
    async with desk.sessions.begin() as session:
        assert not await state.close_assignment(session, first.id, "ana", desk.clock.now)
    assert await desk.open_load("ana") == 1
    assert await desk.where(desk.email(), desk.email()) == [ANA, BUSY]


async def test_load_counts_within_the_load_window_only(db: AsyncEngine) -> None:
    """Unanswered messages older than ``routing.load_window`` no longer count."""
    await seed_directory(db)
    clock = Clock(MONDAY)
    desk = Desk(db, clock, SETTINGS.model_copy(update={"load_window": timedelta(hours=1)}))
    await desk.replied("ana")
    assert await desk.where(desk.email(), desk.email()) == [ANA, ANA]
    clock.advance(timedelta(minutes=59))
    assert await desk.where(desk.email()) == [BUSY]
    clock.advance(timedelta(minutes=2))  # the first two are 61 minutes old
    assert await desk.where(desk.email(), desk.email()) == [ANA, ANA]
    assert await desk.where(desk.email()) == [BUSY]
    assert await desk.open_load("ana") == 4, "aged out of the count, still unanswered"


async def test_a_batch_sends_the_agent_only_what_fits(desk: Desk) -> None:
    """At capacity - 1, of a batch of five emails one goes to Ana, four to the team; the
    batch's own assignments count, not only the stored ones."""
    assert await desk.where(desk.email()) == [ANA]
    desk.clock.advance(timedelta(minutes=1))
    decisions = await desk.route(*(desk.email() for _ in range(5)))
    got = [(d.route.routing_key, d.route.reason) for d in decisions]
    assert got == [ANA] + [BUSY] * 4
    # decided so by the policy (the claim's recount is only the guard against other routers)
    for decision in decisions[1:]:
        assert "last_agent: ana is at capacity (2 of 2 open), not taken" in decision.route.steps
        assert not decision.route.steps[-1].startswith("capacity:")
    assert await desk.open_load("ana") == 2


async def test_capacity_is_per_channel(desk: Desk) -> None:
    """sms=1 and email=2 are separate counts; whatsapp has no limit; a full email count
    does not stop an SMS."""
    got = await desk.where(desk.sms(), desk.sms(), desk.email(), desk.email(), desk.email())
    assert got == [ANA, BUSY, ANA, ANA, BUSY]
    whatsapp = [desk.message("whatsapp", ACME_PHONE, "phone") for _ in range(4)]
    assert await desk.where(*whatsapp) == [ANA] * 4
    assert await desk.open_load("ana") == 7


async def test_away_until_with_a_deputy(desk: Desk) -> None:
    """agent.status away until 13:00 with deputy Bob: Bob takes Ana's customer (for her)
    until then, within his own capacity, and his share counts as his load; after 13:00,
    Ana again."""
    await desk.presence("ana", "away", until=MONDAY + timedelta(hours=2), deputy="bob")
    decisions = await desk.route(desk.email(), desk.email())
    routes = [(d.route.routing_key, d.route.reason, d.route.for_agent) for d in decisions]
    assert routes == [
        ("agent.bob", "deputy", "ana"),
        ("team.billing", "last_agent_fallback", None),
    ], "bob's email capacity is 1"
    assert decisions[0].route.fallback_team == "billing"
    assert decisions[0].dial == "client:bob"
    assert await desk.open_load("bob") == 1
    assert (
        "last_agent: ana is away until 2026-05-04T13:00+03:00; "
        "deputy bob is at capacity (1 of 1 open), not taken" in decisions[1].route.steps
    )

    desk.clock.advance(timedelta(hours=2))  # until has passed: back at work
    assert await desk.where(desk.email()) == [ANA]


async def test_agents_csv_deputy_unless_the_event_names_one(desk: Desk) -> None:
    """Without a deputy in the event, agents.csv's (Cem) stands in; a deputy who is away
    themself is not used and the message goes to the team."""
    await desk.presence("ana", "away")
    decision = (await desk.route(desk.email()))[0]
    assert (decision.route.routing_key, decision.route.reason, decision.route.for_agent) == (
        "agent.cem",
        "deputy",
        "ana",
    )
    desk.clock.advance(timedelta(minutes=1))
    await desk.presence("cem", "offline")
    assert await desk.where(desk.email()) == [("team.billing", "last_agent_fallback")]
    desk.clock.advance(timedelta(minutes=1))
    await desk.presence("ana", "available")
    assert await desk.where(desk.email()) == [ANA]


async def test_an_agent_outside_own_hours_is_away(desk: Desk) -> None:
    """Dora works mornings: her customer goes to her at 11:00 and to the team at 15:00."""
    await desk.replied("dora")
    dora = ("agent.dora", "last_agent")
    assert await desk.where(desk.email()) == [dora]
    desk.clock.advance(timedelta(hours=4))
    assert await desk.where(desk.email()) == [("team.billing", "last_agent_fallback")]


async def test_voice_to_a_closed_team_answers_its_after_hours_dial(desk: Desk) -> None:
    """Like the voice webhook (``context=False``): a closed team with nobody after hours
    answers its after_hours_dial; one with an open after-hours team dials that team; an
    open team its own line."""
    globex = desk.message("voice", GLOBEX_PHONE, "phone")
    acme = desk.message("voice", ACME_PHONE, "phone")
    open_globex, open_acme = await desk.decider.decide_many([globex, acme], context=False)
    assert (open_globex.route.reason, open_globex.dial) == (
        "dedicated_team",
        "sip:network@pbx.test",
    )
    assert (open_acme.route.reason, open_acme.dial) == ("dedicated_team", "+902125550100")

    desk.clock.now = SATURDAY
    closed_globex, closed_acme = await desk.decider.decide_many([globex, acme], context=False)
    assert closed_globex.route.routing_key == "team.network"
    assert closed_globex.route.opens_at == datetime.fromisoformat("2026-05-11T09:00+03:00")
    assert closed_globex.dial == "sip:network-closed@pbx.test"
    assert closed_globex.fallback_dial is None
    assert (closed_acme.route.routing_key, closed_acme.route.reason) == (
        "team.oncall",
        "after_hours",
    )
    assert closed_acme.dial == "sip:oncall@pbx.test"


async def test_holiday_sends_the_team_to_its_after_hours_team(desk: Desk) -> None:
    """Kurban Bayramı (TR calendar of the billing team): reason holiday, to on call."""
    desk.clock.now = datetime.fromisoformat("2026-05-27T10:00+03:00")
    assert await desk.where(desk.sms()) == [("team.oncall", "holiday")]


async def test_voice_to_a_team_that_is_never_open_answers_its_after_hours_dial(
    desk: Desk,
) -> None:
    """hours = closed (open only on company days): a call is answered by the recording."""
    labco = desk.message("voice", LABCO_PHONE, "phone")
    (decision,) = await desk.decider.decide_many([labco], context=False)
    assert decision.route.routing_key == "team.lab"
    assert any("team lab closed" in step for step in decision.route.steps)
    assert decision.dial == "sip:lab-closed@pbx.test"


async def test_a_company_day_closes_a_team_without_weekly_hours(desk: Desk) -> None:
    """A team open around the clock is closed on its holidays.csv day (the picnic)."""
    assert await desk.where(desk.message("email", FUN_MAIL, "email")) == [
        ("team.oncall", "holiday")
    ]


async def test_two_routers_deciding_at_once_keep_the_capacity(desk: Desk) -> None:
    """Two routers (two engines, two deciders) both decide an email for Ana, one below her
    capacity, before either claims: the claim counts again, so only one becomes hers; the
    other goes to the team with the reason and a step saying why."""
    assert await desk.where(desk.email()) == [ANA]  # 1 of 2 open
    other = Desk(create_engine(desk.engine.url.render_as_string(hide_password=False)), desk.clock)
    try:
        first, second = desk.email(), desk.email()
        mine, theirs = await asyncio.gather(
            desk.decider.decide_many([first]), other.decider.decide_many([second])
        )
        assert mine[0].route.routing_key == theirs[0].route.routing_key == "agent.ana"
        claimed = await asyncio.gather(
            desk.claim([RoutedMessage(message=first, route=mine[0].route)]),
            other.claim([RoutedMessage(message=second, route=theirs[0].route)]),
        )
    finally:
        await other.engine.dispose()
    routes = sorted((c[0].route.routing_key, c[0].route.reason) for c in claimed)
    assert routes == sorted([ANA, BUSY])
    (busy,) = [c[0].route for c in claimed if c[0].route.kind == "team"]
    assert busy.steps[-1].startswith("capacity: ana reached 2 open on email meanwhile")
    assert await desk.open_load("ana") == 2


async def test_an_unproven_sender_to_a_closed_team_carries_no_customer_context(
    desk: Desk,
) -> None:
    """Issue 13 meets issue 15: a mail failing DMARC on Saturday goes to billing's after-hours
    team (reason after_hours, which hides unverified_sender), and still without the customer's
    name, id or recent contacts, as on a weekday."""
    desk.decider.settings = SETTINGS.model_copy(update={"require_authenticated_email": True})
    spoofed = desk.email()
    spoofed.meta["auth"] = {"dmarc": "fail", "authserv_id": "mx.support.test"}
    for now, where in ((SATURDAY, ("team.oncall", "after_hours")), (MONDAY, None)):
        desk.clock.now = now
        (decision,) = await desk.decider.decide_many([spoofed])
        if where is not None:
            assert (decision.route.routing_key, decision.route.reason) == where
        else:
            assert decision.route.reason == "unverified_sender"
        assert decision.customer is None


async def test_an_answer_to_an_unknown_senders_message_closes_its_assignment(desk: Desk) -> None:
    """An unknown sender has no customer to close assignments by: the agent's answer to the
    message (``answers``, as the dispatcher finds it) closes that message's assignment, and
    no other agent's or message's."""
    now = desk.clock.now
    async with desk.sessions.begin() as session:
        for message_id, agent_id in (("m-stranger", "bora"), ("m-other", "bora")):
            session.add(
                Assignment(
                    message_id=message_id,
                    agent_id=agent_id,
                    customer_id=None,
                    channel="email",
                    assigned_at=utc(now - timedelta(minutes=5)),  # as the router writes it
                    attempt=2,
                )
            )
    assert await desk.open_load("bora") == 2
    for agent_id, left in (("ana", 2), ("bora", 1)):  # ana's answer closes nothing of bora's
        await desk.replied(agent_id, None, answers="m-stranger")
        assert await desk.open_load("bora") == left, agent_id  # m-other stays open
