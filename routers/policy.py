"""The routing policy (DESIGN.md, "Routing policy"): a pure function with a reason for every
decision and a trace of every step, so ``omniroute route explain`` shows the same thinking
the router applied.

Order, first match wins: thread owner (email), last agent (sticky channels, within
``sticky_for``), the customer's dedicated team, then the team of the address the message
arrived on, ``routing.default_team``, else triage. An unavailable agent never receives a
message: the policy goes on to the team and names the step it fell back from.

A sender that is not proven (issue 13: an email that fails DMARC or has no pass, when
``require_authenticated_email``; a call whose caller ID failed STIR/SHAKEN) is matched to
the customer only to find their team: no thread owner, no last agent, reason
``unverified_sender``; the decider then leaves the customer's context out of the route.
"""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ingest.schema import InboundMessage, Route
from ingest.sender_auth import describe, failed_verstat, verified
from routers.directory import CustomerRecord
from routers.settings import RoutingSettings

UNVERIFIED = "unverified_sender"


@dataclass(frozen=True)
class AgentFacts:
    id: str
    team_id: str | None
    active: bool
    presence: str

    @property
    def available(self) -> bool:
        return self.active and self.presence == "available"

    def why_not(self) -> str:
        return "deactivated" if not self.active else self.presence


@dataclass(frozen=True)
class Facts:
    """What the decider read from the directory and state for one message."""

    customer: CustomerRecord | None
    thread_owner: AgentFacts | None = None
    last_agent: AgentFacts | None = None
    last_agent_at: datetime | None = None


def decide(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime
) -> Route:
    steps: list[str] = []
    fallback_from: str | None = None

    def route(kind: str, target: str | None, reason: str) -> Route:
        return Route.model_validate(
            {
                "kind": kind,
                "target": target,
                "reason": reason,
                "decided_at": now,
                "steps": steps,
                "fallback_team": facts.customer.team_id
                if kind == "agent" and facts.customer
                else None,
            }
        )

    if message.meta.get("bounce"):
        steps.append("bounce: a delivery report goes to triage, never to an agent")
        return route("triage", None, "bounce")

    customer = facts.customer
    if customer is None:
        steps.append("customer: no identity matches the sender")
        return _by_address(message, settings, steps, route, "unknown_sender")
    steps.append(f"customer: {customer.id}")

    doubt = _unproven(message, settings, steps)
    if doubt is not None:
        steps.append(f"sender: {doubt}, not taken as customer {customer.id}'s own")
        steps.append("thread_owner, last_agent: not used for an unproven sender")
        if customer.team_id:
            steps.append(f"dedicated_team: {customer.team_id}")
            return route("team", customer.team_id, UNVERIFIED)
        steps.append("dedicated_team: the customer has no team")
        return _by_address(message, settings, steps, route, UNVERIFIED)

    owner = facts.thread_owner
    if message.channel == "email" and owner is not None:
        if owner.available:
            steps.append(f"thread_owner: {owner.id} sent the message this one answers")
            return route("agent", owner.id, "thread_owner")
        steps.append(f"thread_owner: {owner.id} is {owner.why_not()}, not taken")
        fallback_from = "thread_owner"
    elif message.channel == "email":
        steps.append("thread_owner: no message of ours is referenced")
    else:
        steps.append(f"thread_owner: not used on {message.channel}")

    last = facts.last_agent
    if message.channel not in settings.sticky_channels:
        steps.append(f"last_agent: {message.channel} is not sticky")
    elif last is None or facts.last_agent_at is None:
        steps.append("last_agent: nobody has answered this customer yet")
    elif now - facts.last_agent_at > settings.sticky_for:
        steps.append(
            f"last_agent: {last.id} answered at {facts.last_agent_at.isoformat()}, "
            f"longer ago than {settings.sticky_for}"
        )
    elif not last.available:
        steps.append(f"last_agent: {last.id} is {last.why_not()}, not taken")
        fallback_from = fallback_from or "last_agent"
    else:
        steps.append(f"last_agent: {last.id} answered at {facts.last_agent_at.isoformat()}")
        return route("agent", last.id, "last_agent")

    if customer.team_id:
        reason = f"{fallback_from}_fallback" if fallback_from else "dedicated_team"
        steps.append(f"dedicated_team: {customer.team_id}")
        return route("team", customer.team_id, reason)
    steps.append("dedicated_team: the customer has no team")
    return _by_address(message, settings, steps, route, "no_team")


def _unproven(message: InboundMessage, settings: RoutingSettings, steps: list[str]) -> str | None:
    """Why the sender is not proven to be who the message names, or None. Email counts only
    with ``require_authenticated_email`` (a verified mail adds a step saying so); a failed
    caller-ID verification always counts, as the carrier checked and said no."""
    if message.channel == "email" and settings.require_authenticated_email:
        auth = message.meta.get("auth")
        if not verified(auth):
            return describe(auth)
        steps.append(f"sender: {describe(auth)}")
    elif message.channel == "voice":
        failed = failed_verstat(message.meta)
        if failed is not None:
            return f"caller ID failed STIR/SHAKEN verification ({failed})"
    return None


def _by_address(
    message: InboundMessage,
    settings: RoutingSettings,
    steps: list[str],
    route: Callable[[str, str | None, str], Route],
    reason: str,
) -> Route:
    """Step 5: the team of the address it arrived on, the default team, else triage."""
    mapped = message.meta.get("address_team")
    if not mapped and message.recipient is not None:
        wanted = message.recipient.address.casefold()
        mapped = next(
            (team for addr, team in settings.address_teams.items() if addr.casefold() == wanted),
            None,
        )
    if mapped:
        arrived = message.recipient.address if message.recipient else "?"
        steps.append(f"address: {arrived} belongs to team {mapped}")
        return route("team", str(mapped), reason)
    if settings.default_team:
        steps.append(f"default_team: {settings.default_team}")
        return route("team", settings.default_team, reason)
    steps.append("triage: no address team and no routing.default_team")
    return route("triage", None, reason)
