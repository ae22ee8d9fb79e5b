"""The routing policy, rule by rule (DESIGN.md "Routing policy"): a chain of pure functions,
so every case is a row in one table of (facts, message, settings) -> (kind, target, reason).
Adding a rule adds its rows here."""

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.schema import Identity, InboundMessage, Thread
from routers.decider import DirectoryDecider
from routers.directory import CustomerRecord, TeamRecord
from routers.policy import CHAIN, AgentFacts, Facts, decide, trace
from routers.settings import RoutingSettings
from routers.store.transactions import transactions_of
from tests.seed import seed

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ACME = CustomerRecord(id="c1", name="Acme", team_id="billing")
LONER = CustomerRecord(id="c2", name="No team", team_id=None)
BILLING = TeamRecord(id="billing", name="Billing", dial="+902125550100", email=None)
ANA = AgentFacts(id="ana", team_id="billing", active=True, presence="available")
ANA_AWAY = AgentFacts(id="ana", team_id="billing", active=True, presence="away")
ANA_GONE = AgentFacts(id="ana", team_id="billing", active=False, presence="available")
BOB = AgentFacts(id="bob", team_id="billing", active=True, presence="available")
BOB_OFF = AgentFacts(id="bob", team_id="billing", active=True, presence="offline")


def msg(channel: str = "email", *, to: str | None = None, **meta: object) -> InboundMessage:
    kind = {"email": "email", "sms": "phone", "voice": "phone", "twitter": "twitter"}[channel]
    return InboundMessage(
        channel=channel,  # type: ignore[arg-type]
        external_id="x",
        sender=Identity(kind=kind, address="someone@example.com"),  # type: ignore[arg-type]
        recipient=Identity(kind=kind, address=to) if to else None,  # type: ignore[arg-type]
        thread=Thread(in_reply_to="<m1@x>"),
        meta=dict(meta),
    )


S = RoutingSettings()
S_DEFAULT = RoutingSettings(default_team="frontdesk")
S_ADDR = RoutingSettings(address_teams={"vip@support.example": "enterprise"})
S_ADDR_DEFAULT = RoutingSettings(
    address_teams={"vip@support.example": "enterprise"}, default_team="frontdesk"
)
S_VOICE = RoutingSettings(sticky_channels=["email", "sms", "twitter", "voice"])
RECENT = NOW - timedelta(days=1)
OLD = NOW - timedelta(days=15)

# Sender authentication (issue 13): an unproven sender gets the customer's team, never an
# agent who knows them.
S_REQ = RoutingSettings(require_authenticated_email=True)
S_REQ_DEFAULT = RoutingSettings(require_authenticated_email=True, default_team="frontdesk")
S_REQ_ADDR = RoutingSettings(
    require_authenticated_email=True, address_teams={"vip@support.example": "enterprise"}
)
S_OFF = RoutingSettings(require_authenticated_email=False)
S_REQ_VOICE = RoutingSettings(
    require_authenticated_email=True, sticky_channels=["email", "sms", "twitter", "voice"]
)
PASS = {"spf": "pass", "dkim": "pass", "dmarc": "pass", "authserv_id": "mx.example"}
DKIM_ONLY = {"spf": "none", "dkim": "pass", "dmarc": "none", "authserv_id": "mx.example"}
SPOOF = {"spf": "fail", "dkim": "none", "dmarc": "fail", "authserv_id": "mx.example"}
SPOOF_SPF_PASS = {"spf": "pass", "dkim": "pass", "dmarc": "fail", "authserv_id": "mx.example"}
NO_PASS = {"spf": "softfail", "dkim": "none", "dmarc": "none", "authserv_id": "mx.example"}
OWNER = Facts(ACME, thread_owner=ANA)
LAST = Facts(ACME, last_agent=BOB, last_agent_at=RECENT)
BOTH = Facts(ACME, thread_owner=ANA, last_agent=BOB, last_agent_at=RECENT)
FAILED = "TN-Validation-Failed-A"

# Topic rules (issue 20)
HOSTED = CustomerRecord(id="c3", name="Hosted", team_id="hosting")
S_TOPICS = RoutingSettings.model_validate(
    {
        "address_teams": {"vip@support.example": "enterprise"},
        "rules": [
            {"name": "iptal", "keywords": ["iptal", "cancel"], "team": "cancellations",
             "override_owner": True},
            {"name": "money", "keywords": "fatura", "tag": "money"},
            {"name": "fatura", "keywords": ["fatura", "invoice"], "team": "billing"},
            {"name": "spam", "keywords": "spam", "triage": True},
        ],
    }
)  # fmt: skip


def said(subject: str, *, to: str | None = None) -> InboundMessage:
    return msg(to=to).model_copy(update={"subject": subject, "thread": None})


CASES = [
    # id, facts, message, settings, expected (kind, target, reason)
    # -- bounce
    (
        "bounce never reaches the agent",
        Facts(ACME, thread_owner=ANA, last_agent=ANA, last_agent_at=RECENT),
        msg(bounce=True),
        S,
        ("triage", None, "bounce"),
    ),
    (
        "bounce from a stranger",
        Facts(None),
        msg(bounce=True),
        S_DEFAULT,
        ("triage", None, "bounce"),
    ),
    (
        "spoofed bounce is a bounce",
        BOTH,
        msg(auth=SPOOF, bounce=True),
        S_REQ,
        ("triage", None, "bounce"),
    ),
    # -- customer: an unknown sender goes by address, default team, else triage
    ("unknown sender, no default", Facts(None), msg(), S, ("triage", None, "unknown_sender")),
    (
        "unknown sender, default team",
        Facts(None),
        msg(),
        S_DEFAULT,
        ("team", "frontdesk", "unknown_sender"),
    ),
    (
        "unknown sender, mailbox team",
        Facts(None),
        msg(to="VIP@support.example"),
        S_ADDR,
        ("team", "enterprise", "unknown_sender"),
    ),
    (
        "unknown sender, mailbox team before default team",
        Facts(None),
        msg(to="vip@support.example"),
        S_ADDR_DEFAULT,
        ("team", "enterprise", "unknown_sender"),
    ),
    (
        "unknown sender, another mailbox: default team",
        Facts(None),
        msg(to="other@support.example"),
        S_ADDR_DEFAULT,
        ("team", "frontdesk", "unknown_sender"),
    ),
    (
        "unknown sender, connector named the team",
        Facts(None),
        msg(address_team="network"),
        S,
        ("team", "network", "unknown_sender"),
    ),
    # -- sender (issue 13): an unproven email (with require) or a failed caller ID
    (
        "spoof, thread owner",
        OWNER,
        msg(auth=SPOOF),
        S_REQ,
        ("team", "billing", "unverified_sender"),
    ),
    ("spoof, last agent", LAST, msg(auth=SPOOF), S_REQ, ("team", "billing", "unverified_sender")),
    (
        "spoof, thread owner away: no fallback reason",
        Facts(ACME, thread_owner=ANA_AWAY),
        msg(auth=SPOOF),
        S_REQ,
        ("team", "billing", "unverified_sender"),
    ),
    (
        "dmarc fail beats spf and dkim pass",
        BOTH,
        msg(auth=SPOOF_SPF_PASS),
        S_REQ,
        ("team", "billing", "unverified_sender"),
    ),
    ("no pass at all", LAST, msg(auth=NO_PASS), S_REQ, ("team", "billing", "unverified_sender")),
    ("no trusted header", BOTH, msg(), S_REQ, ("team", "billing", "unverified_sender")),
    ("junk in meta.auth", LAST, msg(auth="pass"), S_REQ, ("team", "billing", "unverified_sender")),
    (
        "spoof, team only",
        Facts(ACME),
        msg(auth=SPOOF),
        S_REQ,
        ("team", "billing", "unverified_sender"),
    ),
    (
        "spoof, no team",
        Facts(LONER),
        msg(auth=SPOOF),
        S_REQ,
        ("triage", None, "unverified_sender"),
    ),
    (
        "spoof, no team, default team",
        Facts(LONER),
        msg(auth=SPOOF),
        S_REQ_DEFAULT,
        ("team", "frontdesk", "unverified_sender"),
    ),
    (
        "spoof, no team, mailbox team",
        Facts(LONER),
        msg(to="vip@support.example", auth=SPOOF),
        S_REQ_ADDR,
        ("team", "enterprise", "unverified_sender"),
    ),
    (
        "spoof from a stranger is still unknown",
        Facts(None),
        msg(auth=SPOOF),
        S_REQ,
        ("triage", None, "unknown_sender"),
    ),
    ("verified, thread owner", BOTH, msg(auth=PASS), S_REQ, ("agent", "ana", "thread_owner")),
    (
        "verified by dkim, last agent",
        LAST,
        msg(auth=DKIM_ONLY),
        S_REQ,
        ("agent", "bob", "last_agent"),
    ),
    (
        "verified, team",
        Facts(ACME),
        msg(auth=PASS),
        S_REQ,
        ("team", "billing", "dedicated_team"),
    ),
    ("verified, no team", Facts(LONER), msg(auth=PASS), S_REQ, ("triage", None, "no_team")),
    (
        "require off: spoof as today",
        OWNER,
        msg(auth=SPOOF),
        S_OFF,
        ("agent", "ana", "thread_owner"),
    ),
    ("require unset: spoof as today", LAST, msg(auth=SPOOF), S, ("agent", "bob", "last_agent")),
    ("require is about email only", LAST, msg("sms"), S_REQ, ("agent", "bob", "last_agent")),
    (
        "failed caller ID, sticky voice",
        LAST,
        msg("voice", stir_verstat=FAILED),
        S_VOICE,
        ("team", "billing", "unverified_sender"),
    ),
    (
        "failed caller ID, whatever require says",
        LAST,
        msg("voice", stir_verstat="tn-validation-failed-c"),
        S_REQ_VOICE,
        ("team", "billing", "unverified_sender"),
    ),
    (
        "failed caller ID, voice not sticky",
        Facts(ACME),
        msg("voice", stir_verstat=FAILED),
        S,
        ("team", "billing", "unverified_sender"),
    ),
    (
        "failed caller ID, no team",
        Facts(LONER),
        msg("voice", stir_verstat=FAILED),
        S_DEFAULT,
        ("team", "frontdesk", "unverified_sender"),
    ),
    (
        "failed caller ID from a stranger is still unknown",
        Facts(None),
        msg("voice", stir_verstat=FAILED),
        S_DEFAULT,
        ("team", "frontdesk", "unknown_sender"),
    ),
    (
        "passed caller ID, sticky voice",
        LAST,
        msg("voice", stir_verstat="TN-Validation-Passed-A"),
        S_VOICE,
        ("agent", "bob", "last_agent"),
    ),
    (
        "unsigned caller ID is no failure",
        LAST,
        msg("voice", stir_verstat="No-TN-Validation"),
        S_VOICE,
        ("agent", "bob", "last_agent"),
    ),
    # -- thread_owner (email)
    ("thread owner available", OWNER, msg(), S, ("agent", "ana", "thread_owner")),
    (
        "thread owner away -> team",
        Facts(ACME, thread_owner=ANA_AWAY),
        msg(),
        S,
        ("team", "billing", "thread_owner_fallback"),
    ),
    (
        "thread owner deactivated -> team",
        Facts(ACME, thread_owner=ANA_GONE),
        msg(),
        S,
        ("team", "billing", "thread_owner_fallback"),
    ),
    (
        "thread owner away, last agent available",
        Facts(ACME, thread_owner=ANA_AWAY, last_agent=BOB, last_agent_at=RECENT),
        msg(),
        S,
        ("agent", "bob", "last_agent"),
    ),
    (
        "thread owner away, last agent offline: the first fallback names it",
        Facts(ACME, thread_owner=ANA_AWAY, last_agent=BOB_OFF, last_agent_at=RECENT),
        msg(),
        S,
        ("team", "billing", "thread_owner_fallback"),
    ),
    (
        "thread owner away, last agent expired",
        Facts(ACME, thread_owner=ANA_AWAY, last_agent=BOB, last_agent_at=OLD),
        msg(),
        S,
        ("team", "billing", "thread_owner_fallback"),
    ),
    (
        "thread owner away, customer without team",
        Facts(LONER, thread_owner=ANA_AWAY),
        msg(),
        S_DEFAULT,
        ("team", "frontdesk", "no_team"),
    ),
    (
        "thread owner only counts on email",
        OWNER,
        msg("sms"),
        S,
        ("team", "billing", "dedicated_team"),
    ),
    # -- last_agent (sticky channels, within sticky_for)
    ("last agent within sticky_for", LAST, msg("sms"), S, ("agent", "bob", "last_agent")),
    (
        "last agent expired",
        Facts(ACME, last_agent=BOB, last_agent_at=OLD),
        msg("sms"),
        S,
        ("team", "billing", "dedicated_team"),
    ),
    (
        "last agent without a time is nobody",
        Facts(ACME, last_agent=BOB),
        msg("sms"),
        S,
        ("team", "billing", "dedicated_team"),
    ),
    (
        "last agent offline -> team",
        Facts(ACME, last_agent=BOB_OFF, last_agent_at=RECENT),
        msg("twitter"),
        S,
        ("team", "billing", "last_agent_fallback"),
    ),
    (
        "last agent deactivated -> team",
        Facts(ACME, last_agent=ANA_GONE, last_agent_at=RECENT),
        msg("email"),
        S,
        ("team", "billing", "last_agent_fallback"),
    ),
    (
        "last agent offline, customer without team",
        Facts(LONER, last_agent=BOB_OFF, last_agent_at=RECENT),
        msg("sms"),
        S,
        ("triage", None, "no_team"),
    ),
    (
        "voice goes to the team by default",
        LAST,
        msg("voice"),
        S,
        ("team", "billing", "dedicated_team"),
    ),
    ("voice made sticky", LAST, msg("voice"), S_VOICE, ("agent", "bob", "last_agent")),
    # -- dedicated_team
    ("known, nothing else", Facts(ACME), msg(), S, ("team", "billing", "dedicated_team")),
    (
        "known, the team read from the directory",
        Facts(ACME, team=BILLING),
        msg("voice"),
        S,
        ("team", "billing", "dedicated_team"),
    ),
    # -- address, default_team, triage: a known customer without a team
    ("known without team", Facts(LONER), msg(), S, ("triage", None, "no_team")),
    (
        "known without team, default team",
        Facts(LONER),
        msg(),
        S_DEFAULT,
        ("team", "frontdesk", "no_team"),
    ),
    (
        "known without team, mailbox team",
        Facts(LONER),
        msg(to="vip@support.example"),
        S_ADDR_DEFAULT,
        ("team", "enterprise", "no_team"),
    ),
    # -- topic rules (issue 20): after the customer's own people, unless override_owner
    (
        "unknown sender writing about an invoice: the topic's team",
        Facts(None),
        said("Faturamı ödeyemiyorum"),
        S_TOPICS,
        ("team", "billing", "topic"),
    ),
    (
        "known customer's invoice mail stays with their team",
        Facts(HOSTED),
        said("fatura"),
        S_TOPICS,
        ("team", "hosting", "dedicated_team"),
    ),
    (
        "known customer's invoice mail stays with the agent who answered them",
        Facts(HOSTED, last_agent=BOB, last_agent_at=RECENT),
        said("fatura"),
        S_TOPICS,
        ("agent", "bob", "last_agent"),
    ),
    (
        "override_owner takes a cancellation from the agent",
        Facts(HOSTED, last_agent=BOB, last_agent_at=RECENT),
        said("İPTAL etmek istiyorum"),
        S_TOPICS,
        ("team", "cancellations", "topic"),
    ),
    (
        "a rule's triage action",
        Facts(LONER),
        said("spam spam"),
        S_TOPICS,
        ("triage", None, "topic"),
    ),
    (
        "no rule matches: the address decides as before",
        Facts(None),
        said("kargom nerede", to="vip@support.example"),
        S_TOPICS,
        ("team", "enterprise", "unknown_sender"),
    ),
]

#: rules that only note what later rules read, and never decide themselves
NEVER_DECIDE = {"customer", "sender"}


def _walk(case: tuple[Any, ...]) -> Any:
    _, facts, message, settings, _ = case
    return decide(message, facts, settings, NOW)


@pytest.mark.parametrize(
    ("facts", "message", "settings", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_policy_table(
    facts: Facts,
    message: InboundMessage,
    settings: RoutingSettings,
    expected: tuple[str, str | None, str],
) -> None:
    """Each rule of the chain, and each of its fallbacks, gives its kind, target and reason."""
    route = decide(message, facts, settings, NOW)
    assert (route.kind, route.target, route.reason) == expected
    assert route.decided_at == NOW
    assert route.steps, "every decision explains itself"
    ran = [step.partition(": ")[0] for step in route.steps]
    assert ran == [rule.__name__ for rule in CHAIN][: len(ran)], "one step per rule, in order"
    team = facts.customer.team_id if facts.customer else None
    assert route.fallback_team == (team if route.kind == "agent" else None)
    if route.reason == "unverified_sender":
        assert route.kind != "agent"
        assert route.fallback_team is None


def test_every_rule_that_can_decide_has_rows() -> None:
    """A rule added to the chain without its rows in the table fails here."""
    decided = {
        link.rule for case in CASES for link in trace(_walk(case)) if link.outcome == "decided"
    }
    assert decided == {rule.__name__ for rule in CHAIN} - NEVER_DECIDE


def test_a_topic_route_names_its_rule_and_tags() -> None:
    """route.rule names the rule that decided; a tag rule tags without deciding."""
    route = decide(said("Faturam"), Facts(None), S_TOPICS, NOW)
    assert (route.rule, route.tags) == ("fatura", ["money"])
    assert "topic: rule fatura matches: team.billing" in route.steps
    kept = decide(said("fatura"), Facts(HOSTED), S_TOPICS, NOW)
    assert (kept.rule, kept.tags) == (None, ["money"])


def test_agent_route_names_the_team_as_fallback() -> None:
    """A voice call to an agent needs the team's line when the agent does not answer."""
    route = decide(msg("sms"), LAST, S, NOW)
    assert route.fallback_team == "billing"


def test_sticky_for_boundary_is_inclusive() -> None:
    """Exactly sticky_for ago still counts; a second later it does not."""
    at = NOW - S.sticky_for
    route = decide(msg("sms"), Facts(ACME, last_agent=BOB, last_agent_at=at), S, NOW)
    assert route.reason == "last_agent"
    later = NOW + timedelta(seconds=1)
    route = decide(msg("sms"), Facts(ACME, last_agent=BOB, last_agent_at=at), S, later)
    assert route.reason == "dedicated_team"


def test_unproven_sender_steps_say_why() -> None:
    """route explain shows which server said what, and whose customer it is not taken as."""
    route = decide(msg(auth=SPOOF), BOTH, S_REQ, NOW)
    assert (
        "sender: DMARC fail at mx.example (spf=fail dkim=none), not taken as customer c1's own"
        in (route.steps)
    )
    assert "thread_owner: not used for an unproven sender" in route.steps
    assert "last_agent: not used for an unproven sender" in route.steps
    route = decide(msg(auth=PASS), BOTH, S_REQ, NOW)
    assert "sender: authenticated at mx.example (spf=pass dkim=pass dmarc=pass)" in route.steps
    route = decide(msg("voice", stir_verstat=FAILED), LAST, S_VOICE, NOW)
    assert any("STIR/SHAKEN" in step and FAILED in step for step in route.steps), route.steps


def test_fallback_steps_say_who_was_not_taken() -> None:
    """The team's reason names a fallback; the steps say which agent and why."""
    facts = Facts(ACME, thread_owner=ANA_AWAY, last_agent=BOB_OFF, last_agent_at=RECENT)
    route = decide(msg(), facts, S, NOW)
    assert route.steps[3:] == [
        "topic_override: no override_owner or tag rules",
        "thread_owner: ana is away, not taken",
        "last_agent: bob is offline, not taken",
        "dedicated_team: billing",
    ]


def test_trace_shows_the_whole_chain_as_it_ran() -> None:
    """route explain lists every rule: the ones that passed, the one that decided, the rest."""
    route = decide(msg("sms"), Facts(ACME, last_agent=BOB_OFF, last_agent_at=RECENT), S, NOW)
    links = trace(route)
    assert [link.rule for link in links] == [rule.__name__ for rule in CHAIN]
    assert [link.outcome for link in links] == ["passed"] * 6 + ["decided"] + ["not reached"] * 4
    assert links[0].step == "not a delivery report"
    assert links[5].step == "bob is offline, not taken"
    assert links[6].step == "billing"
    assert links[7].step is None


def test_facts_name_each_agent_involved_once() -> None:
    """A rule about agents (capacity, deputies) sees each of them once."""
    assert Facts(ACME, thread_owner=ANA, last_agent=BOB).agents == (ANA, BOB)
    assert Facts(ACME, thread_owner=ANA, last_agent=ANA_AWAY).agents == (ANA,)
    assert Facts(ACME, last_agent=BOB).agents == (BOB,)
    assert Facts(None).agents == ()


@pytest.fixture
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """The SQL the decider's database work runs, observed through SQLAlchemy's events."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(args[2])

    target = transactions_of(engine).engine
    event.listen(target, "before_cursor_execute", record)
    yield seen
    event.remove(target, "before_cursor_execute", record)


async def test_decider_reads_the_customers_team_before_deciding(
    engine: AsyncEngine, statements: list[str]
) -> None:
    """The policy sees the customer's team as the directory has it; a batch reads every team
    it needs (the customers', the address's, the default) in one query, none after."""
    await seed(engine)
    settings = RoutingSettings(
        default_region="TR",
        default_team="network",
        address_teams={"+908505550000": "billing"},
    )
    decider = DirectoryDecider(engine, settings)
    messages = [
        InboundMessage(
            channel="voice",
            external_id=f"CA{i:032x}",
            sender=Identity(kind="phone", address=sender),
            recipient=Identity(kind="phone", address=to),
        )
        for i, (sender, to) in enumerate(
            [
                ("+905321112233", "+908505550001"),  # acme: team billing
                ("+905329990000", "+908505550000"),  # a stranger on billing's number
                ("+905329990001", "+908505550001"),  # a stranger: the default team
            ]
        )
    ]
    statements.clear()
    answers = await decider.explain_many(messages)
    assert sum("FROM teams" in sql for sql in statements) == 1, statements
    (acme, acme_facts), (by_number, _), (stranger, _) = answers
    assert acme_facts.team == TeamRecord("billing", "Billing", "+902125550100", "billing@x.test")
    assert (acme.route.reason, acme.dial) == ("dedicated_team", "+902125550100")
    assert (by_number.route.routing_key, by_number.dial) == ("team.billing", "+902125550100")
    assert (stranger.route.routing_key, stranger.dial) == ("team.network", "sip:network@pbx.test")
