"""The routing policy (DESIGN.md, "Routing policy"): an ordered chain of small rules, each a
pure function of the message and the facts read before deciding, so ``omniroute route
explain`` shows the same thinking the router applied.

``CHAIN`` names the rules in order; ``decide()`` walks it and the first rule that returns a
``Verdict`` decides. Every rule that runs, the ones that pass included, adds one step
``"<rule>: <what it found>"`` to the route. Adding a rule = one function + one line in
``CHAIN`` + its rows in the table of ``tests/test_policy.py``.

An unavailable agent never receives a message: the chain goes on to the team, whose reason
names the rule it fell back from (``thread_owner_fallback``, ``last_agent_fallback``).

A sender that is not proven (issue 13: an email that fails DMARC or has no pass, when
``require_authenticated_email``; a call whose caller ID failed STIR/SHAKEN) is matched to
the customer only to find their team: no thread owner, no last agent, reason
``unverified_sender``; the decider then leaves the customer's context out of the route.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, NamedTuple

from ingest.schema import InboundMessage, ReasonName, Route, RouteKind
from ingest.sender_auth import describe, failed_verstat, verified
from routers.directory import CustomerRecord, TeamRecord
from routers.settings import RoutingSettings

UNVERIFIED: ReasonName = "unverified_sender"


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
    """What the decider read for one message before deciding: the rules' only view of the
    directory and the routing state.

    ``team`` is the customer's team as the directory has it (None when the customer has
    none, or names one the directory lacks), for the rules that ask about a team."""

    customer: CustomerRecord | None
    thread_owner: AgentFacts | None = None
    last_agent: AgentFacts | None = None
    last_agent_at: datetime | None = None
    team: TeamRecord | None = None

    @property
    def agents(self) -> tuple[AgentFacts, ...]:
        """Each agent this message involves, once: the thread owner, then the last agent."""
        owner, last = self.thread_owner, self.last_agent
        if owner is not None and last is not None and last.id == owner.id:
            last = None
        return tuple(agent for agent in (owner, last) if agent is not None)


class Verdict(NamedTuple):
    """A rule's decision; ``decide()`` makes the ``Route`` of it."""

    kind: RouteKind
    target: str | None
    reason: ReasonName


@dataclass
class Walk:
    """One walk of the chain: the steps so far, and what an earlier rule found that a later
    rule's reason depends on (the sender is unproven, an agent was not available)."""

    rule: str = ""
    steps: list[str] = field(default_factory=list)
    unproven: bool = False
    fallback: ReasonName | None = None

    def step(self, text: str) -> None:
        self.steps.append(f"{self.rule}: {text}")


Rule = Callable[[InboundMessage, Facts, RoutingSettings, datetime, Walk], Verdict | None]


def decide(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime
) -> Route:
    """The first verdict of ``CHAIN``, as a route with the steps of every rule that ran."""
    walk = Walk()
    for rule in CHAIN:
        walk.rule = rule.__name__
        verdict = rule(message, facts, settings, now, walk)
        if verdict is None:
            continue
        kind, target, reason = verdict
        known = facts.customer
        return Route.model_validate(
            {
                "kind": kind,
                "target": target,
                "reason": reason,
                "decided_at": now,
                "steps": walk.steps,
                "fallback_team": known.team_id if kind == "agent" and known else None,
            }
        )
    raise RuntimeError("the routing chain ended without a decision")  # triage always decides


class Link(NamedTuple):
    """One rule of the chain as a walk saw it."""

    rule: str
    outcome: Literal["passed", "decided", "not reached"]
    step: str | None


def trace(route: Route) -> list[Link]:
    """Every rule of ``CHAIN`` in order, with its step in ``route`` and whether it passed,
    decided or was not reached: the chain as it ran, for ``route explain``."""
    said: dict[str, str] = {}
    for step in route.steps:
        rule, _, text = step.partition(": ")
        said[rule] = text
    names = [rule.__name__ for rule in CHAIN]
    last = max((i for i, name in enumerate(names) if name in said), default=-1)
    return [
        Link(
            name,
            "passed" if i < last else "decided" if i == last else "not reached",
            said.get(name),
        )
        for i, name in enumerate(names)
    ]


# The rules, in the order of CHAIN. Each adds exactly one step and returns a Verdict or None.


def bounce(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """A delivery report is never answered by a person: it could loop (DESIGN.md, bad input)."""
    if message.meta.get("bounce"):
        walk.step("a delivery report goes to triage, never to an agent")
        return Verdict("triage", None, "bounce")
    walk.step("not a delivery report")
    return None


def customer(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """Names whom the sender was matched to; an unknown one is routed by address below."""
    walk.step(facts.customer.id if facts.customer else "no identity matches the sender")
    return None


def sender(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """Issue 13: an unproven sender is not taken as the customer's own. Email counts only
    with ``require_authenticated_email``; a failed caller-ID verification always counts, as
    the carrier checked and said no."""
    if facts.customer is None:
        walk.step("no customer to take it for")
        return None
    doubt = None
    if message.channel == "email":
        if not settings.require_authenticated_email:
            walk.step("not checked (routing.require_authenticated_email is off)")
            return None
        auth = message.meta.get("auth")
        if verified(auth):
            walk.step(describe(auth))
            return None
        doubt = describe(auth)
    elif message.channel == "voice":
        failed = failed_verstat(message.meta)
        if failed is None:
            walk.step("the caller ID did not fail verification")
            return None
        doubt = f"caller ID failed STIR/SHAKEN verification ({failed})"
    else:
        walk.step(f"not checked on {message.channel}")
        return None
    walk.unproven = True
    walk.step(f"{doubt}, not taken as customer {facts.customer.id}'s own")
    return None


def thread_owner(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """An email answering one we sent for an agent goes to that agent, if available."""
    owner = facts.thread_owner
    if facts.customer is None:
        walk.step("no customer")
    elif walk.unproven:
        walk.step("not used for an unproven sender")
    elif message.channel != "email":
        walk.step(f"not used on {message.channel}")
    elif owner is None:
        walk.step("no message of ours is referenced")
    elif owner.available:
        walk.step(f"{owner.id} sent the message this one answers")
        return Verdict("agent", owner.id, "thread_owner")
    else:
        walk.step(f"{owner.id} is {owner.why_not()}, not taken")
        walk.fallback = "thread_owner_fallback"
    return None


def last_agent(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """The agent who last answered the customer, on a sticky channel within ``sticky_for``."""
    last, at = facts.last_agent, facts.last_agent_at
    if facts.customer is None:
        walk.step("no customer")
    elif walk.unproven:
        walk.step("not used for an unproven sender")
    elif message.channel not in settings.sticky_channels:
        walk.step(f"{message.channel} is not sticky")
    elif last is None or at is None:
        walk.step("nobody has answered this customer yet")
    elif now - at > settings.sticky_for:
        walk.step(f"{last.id} answered at {at.isoformat()}, longer ago than {settings.sticky_for}")
    elif not last.available:
        walk.step(f"{last.id} is {last.why_not()}, not taken")
        walk.fallback = walk.fallback or "last_agent_fallback"
    else:
        walk.step(f"{last.id} answered at {at.isoformat()}")
        return Verdict("agent", last.id, "last_agent")
    return None


def dedicated_team(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """The customer's team, saying whether it stands in for an unavailable agent."""
    if facts.customer is None:
        walk.step("no customer")
        return None
    team = facts.customer.team_id
    if not team:
        walk.step("the customer has no team")
        return None
    walk.step(team)
    reason: ReasonName = UNVERIFIED if walk.unproven else walk.fallback or "dedicated_team"
    return Verdict("team", team, reason)


def address(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """The team of the address the message arrived on (a mailbox, a number, an X account)."""
    mapped = address_team(message, settings)
    arrived = message.recipient.address if message.recipient else "?"
    if mapped:
        walk.step(f"{arrived} belongs to team {mapped}")
        return Verdict("team", mapped, _no_team_reason(facts, walk))
    walk.step(
        f"{arrived} belongs to no team" if message.recipient else "no address arrived with it"
    )
    return None


def default_team(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """``routing.default_team``, for what no team above took."""
    if settings.default_team:
        walk.step(settings.default_team)
        return Verdict("team", settings.default_team, _no_team_reason(facts, walk))
    walk.step("routing.default_team is not set")
    return None


def triage(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """The end of the chain: a person looks at what nobody above took."""
    walk.step("no address team and no routing.default_team")
    return Verdict("triage", None, _no_team_reason(facts, walk))


CHAIN: tuple[Rule, ...] = (
    bounce,
    customer,
    sender,
    thread_owner,
    last_agent,
    dedicated_team,
    address,
    default_team,
    triage,
)


def address_team(message: InboundMessage, settings: RoutingSettings) -> str | None:
    """The team the connector named for the address, else ``routing.address_teams``'s."""
    mapped = message.meta.get("address_team")
    if not mapped and message.recipient is not None:
        wanted = message.recipient.address.casefold()
        mapped = next(
            (team for addr, team in settings.address_teams.items() if addr.casefold() == wanted),
            None,
        )
    return str(mapped) if mapped else None


def _no_team_reason(facts: Facts, walk: Walk) -> ReasonName:
    """Why a message is routed by address: an unknown or unproven sender, or no team."""
    if facts.customer is None:
        return "unknown_sender"
    return UNVERIFIED if walk.unproven else "no_team"
