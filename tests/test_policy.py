"""The routing policy, branch by branch (DESIGN.md "Routing policy"): a pure function, so
every case is a row in a table."""

from datetime import UTC, datetime, timedelta

import pytest

from ingest.schema import Identity, InboundMessage, Thread
from routers.directory import CustomerRecord
from routers.policy import AgentFacts, Facts, decide
from routers.settings import RoutingSettings

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
ACME = CustomerRecord(id="c1", name="Acme", team_id="billing")
LONER = CustomerRecord(id="c2", name="No team", team_id=None)
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
S_VOICE = RoutingSettings(sticky_channels=["email", "sms", "twitter", "voice"])
RECENT = NOW - timedelta(days=1)
OLD = NOW - timedelta(days=15)

CASES = [
    # id, message, facts, settings, expected (routing key, reason)
    ("unknown sender, no default", msg(), Facts(None), S, ("triage", "unknown_sender")),
    (
        "unknown sender, default team",
        msg(),
        Facts(None),
        S_DEFAULT,
        ("team.frontdesk", "unknown_sender"),
    ),
    (
        "unknown sender, mailbox team",
        msg(to="VIP@support.example"),
        Facts(None),
        S_ADDR,
        ("team.enterprise", "unknown_sender"),
    ),
    (
        "unknown sender, connector named the team",
        msg(address_team="network"),
        Facts(None),
        S,
        ("team.network", "unknown_sender"),
    ),
    ("known, nothing else", msg(), Facts(ACME), S, ("team.billing", "dedicated_team")),
    (
        "thread owner available",
        msg(),
        Facts(ACME, thread_owner=ANA),
        S,
        ("agent.ana", "thread_owner"),
    ),
    (
        "thread owner away -> team",
        msg(),
        Facts(ACME, thread_owner=ANA_AWAY),
        S,
        ("team.billing", "thread_owner_fallback"),
    ),
    (
        "thread owner away, last agent available",
        msg(),
        Facts(ACME, thread_owner=ANA_AWAY, last_agent=BOB, last_agent_at=RECENT),
        S,
        ("agent.bob", "last_agent"),
    ),
    (
        "thread owner only counts on email",
        msg("sms"),
        Facts(ACME, thread_owner=ANA),
        S,
        ("team.billing", "dedicated_team"),
    ),
    (
        "last agent within sticky_for",
        msg("sms"),
        Facts(ACME, last_agent=BOB, last_agent_at=RECENT),
        S,
        ("agent.bob", "last_agent"),
    ),
    (
        "last agent expired",
        msg("sms"),
        Facts(ACME, last_agent=BOB, last_agent_at=OLD),
        S,
        ("team.billing", "dedicated_team"),
    ),
    (
        "last agent offline -> team",
        msg("twitter"),
        Facts(ACME, last_agent=BOB_OFF, last_agent_at=RECENT),
        S,
        ("team.billing", "last_agent_fallback"),
    ),
    (
        "last agent deactivated -> team",
        msg("email"),
        Facts(ACME, last_agent=ANA_GONE, last_agent_at=RECENT),
        S,
        ("team.billing", "last_agent_fallback"),
    ),
    (
        "voice goes to the team by default",
        msg("voice"),
        Facts(ACME, last_agent=BOB, last_agent_at=RECENT),
        S,
        ("team.billing", "dedicated_team"),
    ),
    (
        "voice made sticky",
        msg("voice"),
        Facts(ACME, last_agent=BOB, last_agent_at=RECENT),
        S_VOICE,
        ("agent.bob", "last_agent"),
    ),
    ("known without team", msg(), Facts(LONER), S, ("triage", "no_team")),
    (
        "known without team, default team",
        msg(),
        Facts(LONER),
        S_DEFAULT,
        ("team.frontdesk", "no_team"),
    ),
    (
        "bounce never reaches the agent",
        msg(bounce=True),
        Facts(ACME, thread_owner=ANA, last_agent=ANA, last_agent_at=RECENT),
        S,
        ("triage", "bounce"),
    ),
]


@pytest.mark.parametrize(
    ("message", "facts", "settings", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_policy_table(
    message: InboundMessage,
    facts: Facts,
    settings: RoutingSettings,
    expected: tuple[str, str],
) -> None:
    """Each branch of DESIGN.md's order gives its routing key and reason."""
    route = decide(message, facts, settings, NOW)
    assert (route.routing_key, route.reason) == expected
    assert route.steps, "every decision explains itself"
    assert route.decided_at == NOW


def test_agent_route_names_the_team_as_fallback() -> None:
    """A voice call to an agent needs the team's line when the agent does not answer."""
    route = decide(msg("sms"), Facts(ACME, last_agent=BOB, last_agent_at=RECENT), S, NOW)
    assert route.fallback_team == "billing"


def test_sticky_for_boundary_is_inclusive() -> None:
    """Exactly sticky_for ago still counts; a second later it does not."""
    at = NOW - S.sticky_for
    route = decide(msg("sms"), Facts(ACME, last_agent=BOB, last_agent_at=at), S, NOW)
    assert route.reason == "last_agent"
    later = NOW + timedelta(seconds=1)
    route = decide(msg("sms"), Facts(ACME, last_agent=BOB, last_agent_at=at), S, later)
    assert route.reason == "dedicated_team"


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

SENDER_CASES = [
    # id, message, facts, settings, expected (routing key, reason)
    ("spoof, thread owner", msg(auth=SPOOF), OWNER, S_REQ, ("team.billing", "unverified_sender")),
    ("spoof, last agent", msg(auth=SPOOF), LAST, S_REQ, ("team.billing", "unverified_sender")),
    (
        "dmarc fail beats spf and dkim pass",
        msg(auth=SPOOF_SPF_PASS),
        BOTH,
        S_REQ,
        ("team.billing", "unverified_sender"),
    ),
    ("no pass at all", msg(auth=NO_PASS), LAST, S_REQ, ("team.billing", "unverified_sender")),
    (
        "no trusted header",
        msg(),
        BOTH,
        S_REQ,
        ("team.billing", "unverified_sender"),
    ),
    (
        "junk in meta.auth",
        msg(auth="pass"),
        LAST,
        S_REQ,
        ("team.billing", "unverified_sender"),
    ),
    (
        "spoof, team only",
        msg(auth=SPOOF),
        Facts(ACME),
        S_REQ,
        ("team.billing", "unverified_sender"),
    ),
    ("spoof, no team", msg(auth=SPOOF), Facts(LONER), S_REQ, ("triage", "unverified_sender")),
    (
        "spoof, no team, default team",
        msg(auth=SPOOF),
        Facts(LONER),
        S_REQ_DEFAULT,
        ("team.frontdesk", "unverified_sender"),
    ),
    (
        "spoof, no team, mailbox team",
        msg(to="vip@support.example", auth=SPOOF),
        Facts(LONER),
        S_REQ_ADDR,
        ("team.enterprise", "unverified_sender"),
    ),
    (
        "spoof from a stranger is still unknown",
        msg(auth=SPOOF),
        Facts(None),
        S_REQ,
        ("triage", "unknown_sender"),
    ),
    ("spoofed bounce is a bounce", msg(auth=SPOOF, bounce=True), BOTH, S_REQ, ("triage", "bounce")),
    ("verified, thread owner", msg(auth=PASS), BOTH, S_REQ, ("agent.ana", "thread_owner")),
    ("verified by dkim, last agent", msg(auth=DKIM_ONLY), LAST, S_REQ, ("agent.bob", "last_agent")),
    ("verified, team", msg(auth=PASS), Facts(ACME), S_REQ, ("team.billing", "dedicated_team")),
    ("verified, no team", msg(auth=PASS), Facts(LONER), S_REQ, ("triage", "no_team")),
    ("require off: spoof as today", msg(auth=SPOOF), OWNER, S_OFF, ("agent.ana", "thread_owner")),
    ("require unset: spoof as today", msg(auth=SPOOF), LAST, S, ("agent.bob", "last_agent")),
    (
        "require is about email only",
        msg("sms"),
        LAST,
        S_REQ,
        ("agent.bob", "last_agent"),
    ),
    (
        "failed caller ID, sticky voice",
        msg("voice", stir_verstat=FAILED),
        LAST,
        S_VOICE,
        ("team.billing", "unverified_sender"),
    ),
    (
        "failed caller ID, whatever require says",
        msg("voice", stir_verstat="tn-validation-failed-c"),
        LAST,
        S_REQ_VOICE,
        ("team.billing", "unverified_sender"),
    ),
    (
        "failed caller ID, voice not sticky",
        msg("voice", stir_verstat=FAILED),
        Facts(ACME),
        S,
        ("team.billing", "unverified_sender"),
    ),
    (
        "failed caller ID, no team",
        msg("voice", stir_verstat=FAILED),
        Facts(LONER),
        S_DEFAULT,
        ("team.frontdesk", "unverified_sender"),
    ),
    (
        "passed caller ID, sticky voice",
        msg("voice", stir_verstat="TN-Validation-Passed-A"),
        LAST,
        S_VOICE,
        ("agent.bob", "last_agent"),
    ),
    (
        "unsigned caller ID is no failure",
        msg("voice", stir_verstat="No-TN-Validation"),
        LAST,
        S_VOICE,
        ("agent.bob", "last_agent"),
    ),
]


@pytest.mark.parametrize(
    ("message", "facts", "settings", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in SENDER_CASES],
)
def test_unproven_sender_table(
    message: InboundMessage,
    facts: Facts,
    settings: RoutingSettings,
    expected: tuple[str, str],
) -> None:
    """A sender that is not proven never reaches a thread owner or last agent."""
    route = decide(message, facts, settings, NOW)
    assert (route.routing_key, route.reason) == expected
    assert route.steps, "every decision explains itself"
    if route.reason == "unverified_sender":
        assert route.kind != "agent"
        assert route.fallback_team is None


def test_unproven_sender_steps_say_why() -> None:
    """route explain shows which server said what, and whose customer it is not taken as."""
    route = decide(msg(auth=SPOOF), BOTH, S_REQ, NOW)
    assert (
        "sender: DMARC fail at mx.example (spf=fail dkim=none), not taken as customer c1's own"
        in (route.steps)
    )
    route = decide(msg(auth=PASS), BOTH, S_REQ, NOW)
    assert "sender: authenticated at mx.example (spf=pass dkim=pass dmarc=pass)" in route.steps
    route = decide(msg("voice", stir_verstat=FAILED), LAST, S_VOICE, NOW)
    assert any("STIR/SHAKEN" in step and FAILED in step for step in route.steps), route.steps
