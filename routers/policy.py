"""The routing policy (DESIGN.md, "Routing policy"): an ordered chain of small rules, each a
pure function of the message and the facts read before deciding, so ``omniroute route
explain`` shows the same thinking the router applied.

``decide()`` walks ``CHAIN``; the first rule returning a ``Verdict`` decides, and every rule
that runs adds one step ``"<rule>: <what it found>"``. A new rule: a function, a line in
``CHAIN``, rows in ``tests/test_policy.py``.

An agent who cannot take a message never receives it (issue 15; ``routers.availability``):
one who is away, offline or off work goes to their deputy when the deputy can take it
(reason ``deputy``, ``route.for_agent``), else, like one at capacity, on to the team,
whose reason names the rule it fell back from (``thread_owner_fallback``,
``last_agent_fallback``, ``thread_owner_busy``, ``last_agent_busy``). A team that is closed
hands the message to its open after-hours team (``after_hours``, ``holiday``), or keeps it
with ``route.opens_at``.

A sender that is not proven (issue 13: an email that fails DMARC or has no pass, when
``require_authenticated_email``; a call whose caller ID failed STIR/SHAKEN) is matched to
the customer only to find their team: no thread owner, no last agent, reason
``unverified_sender``; the decider leaves the customer's context out (``doubt``).
"""

from collections.abc import Callable
from datetime import datetime
from typing import Literal, NamedTuple
from zoneinfo import ZoneInfo

from ingest.schema import InboundMessage, ReasonName, Route
from ingest.sender_auth import describe, failed_verstat, verified
from routers.availability import AgentFacts as AgentFacts
from routers.facts import Facts as Facts
from routers.facts import TeamFacts as TeamFacts
from routers.facts import Verdict, Walk
from routers.settings import RoutingSettings

UNVERIFIED: ReasonName = "unverified_sender"


AgentRule = Literal["thread_owner", "last_agent"]
_BUSY: dict[AgentRule, ReasonName] = {
    "thread_owner": "thread_owner_busy",
    "last_agent": "last_agent_busy",
}
_FALLBACK: dict[AgentRule, ReasonName] = {
    "thread_owner": "thread_owner_fallback",
    "last_agent": "last_agent_fallback",
}


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
        kind, target, reason, for_agent, opens_at = verdict
        known = facts.customer
        return Route.model_validate(
            {
                "kind": kind,
                "target": target,
                "reason": reason,
                "decided_at": now,
                "steps": walk.steps,
                "fallback_team": known.team_id if kind == "agent" and known else None,
                "for_agent": for_agent,
                "opens_at": opens_at,
                "rule": walk.topic,
                "tags": walk.tags,
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
    """Issue 13: an unproven sender is not taken as the customer's own (``doubt``)."""
    if facts.customer is None:
        walk.step("no customer to take it for")
        return None
    why = doubt(message, settings)
    if why is None:
        walk.step(_not_doubted(message, settings))
        return None
    walk.unproven = True
    walk.step(f"{why}, not taken as customer {facts.customer.id}'s own")
    return None


def doubt(message: InboundMessage, settings: RoutingSettings) -> str | None:
    """Why the sender is unproven (None: proven or not checked); the decider asks too, as
    a closed team's ``after_hours`` hides ``unverified_sender`` but must not the doubt."""
    if message.channel == "email":
        if not settings.require_authenticated_email:
            return None
        auth = message.meta.get("auth")
        return None if verified(auth) else describe(auth)
    if message.channel == "voice":
        failed = failed_verstat(message.meta)
        return None if failed is None else f"caller ID failed STIR/SHAKEN verification ({failed})"
    return None


def _not_doubted(message: InboundMessage, settings: RoutingSettings) -> str:
    if message.channel == "voice":
        return "the caller ID did not fail verification"
    if message.channel != "email":
        return f"not checked on {message.channel}"
    if not settings.require_authenticated_email:
        return "not checked (routing.require_authenticated_email is off)"
    return describe(message.meta.get("auth"))


def thread_owner(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """An email answering one we sent for an agent goes to that agent, if they can take it."""
    owner = facts.thread_owner
    if facts.customer is None:
        walk.step("no customer")
    elif walk.unproven:
        walk.step("not used for an unproven sender")
    elif message.channel != "email":
        walk.step(f"not used on {message.channel}")
    elif owner is None:
        walk.step("no message of ours is referenced")
    else:
        said = f"{owner.id} sent the message this one answers"
        return _agent(owner, now, walk, said, "thread_owner", first=True)
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
    else:
        return _agent(last, now, walk, f"{last.id} answered at {at.isoformat()}", "last_agent")
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
    reason: ReasonName = UNVERIFIED if walk.unproven else walk.fallback or "dedicated_team"
    return _team(team, reason, facts, now, walk, team)


def address(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """The team of the address the message arrived on (a mailbox, a number, an X account)."""
    mapped = address_team(message, settings)
    arrived = message.recipient.address if message.recipient else "?"
    if mapped:
        said = f"{arrived} belongs to team {mapped}"
        return _team(mapped, _no_team_reason(facts, walk), facts, now, walk, said)
    walk.step(
        f"{arrived} belongs to no team" if message.recipient else "no address arrived with it"
    )
    return None


def default_team(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """``routing.default_team``, for what no team above took."""
    if settings.default_team:
        team, reason = settings.default_team, _no_team_reason(facts, walk)
        return _team(team, reason, facts, now, walk, team)
    walk.step("routing.default_team is not set")
    return None


def triage(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """The end of the chain: a person looks at what nobody above took."""
    walk.step("no address team and no routing.default_team")
    return Verdict("triage", None, _no_team_reason(facts, walk))


def topic_override(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """Issue 20: the ``[[routing.rules]]`` with ``override_owner`` (``iptal`` to cancellations
    for everyone), and every ``tag`` rule, before the customer's own people."""
    return _topic(message, facts, settings, now, walk, early=True)


def topic(
    message: InboundMessage, facts: Facts, settings: RoutingSettings, now: datetime, walk: Walk
) -> Verdict | None:
    """Issue 20: the other ``[[routing.rules]]``, for what no owner or team took."""
    return _topic(message, facts, settings, now, walk, early=False)


def _topic(
    message: InboundMessage,
    facts: Facts,
    settings: RoutingSettings,
    now: datetime,
    walk: Walk,
    *,
    early: bool,
) -> Verdict | None:
    zone = ZoneInfo(settings.timezone)
    found = settings.topics.match(message, facts.customer, now, zone, early=early)
    walk.tags.extend(found.tags)
    if found.rule is None:
        walk.step(found.said)
        return None
    walk.topic = found.rule.name
    if found.rule.team is None:
        walk.step(found.said)
        return Verdict("triage", None, "topic")
    return _team(found.rule.team, "topic", facts, now, walk, found.said)


CHAIN: tuple[Rule, ...] = (
    bounce,
    customer,
    sender,
    topic_override,
    thread_owner,
    last_agent,
    dedicated_team,
    topic,
    address,
    default_team,
    triage,
)


def _agent(
    agent: AgentFacts, now: datetime, walk: Walk, said: str, took: AgentRule, *, first: bool = False
) -> Verdict | None:
    """``agent`` if at work and under capacity; else their deputy if that one can take it
    (never the deputy's deputy); else None, having told the team rules why (``first``: the
    thread owner's reason wins over any other)."""
    why = agent.absent(now)
    if why is None:
        full = agent.busy()
        if full is None:
            walk.step(said)
            return Verdict("agent", agent.id, took)
        walk.step(f"{agent.id} is {full}, not taken")
        _fell_back(walk, _BUSY[took], first)
        return None
    deputy = agent.deputy if agent.active else None
    if deputy is None:
        walk.step(f"{agent.id} is {why}, not taken")
    elif (cannot := deputy.absent(now) or deputy.busy()) is None:
        walk.step(f"{agent.id} is {why}; deputy {deputy.id} stands in")
        return Verdict("agent", deputy.id, "deputy", for_agent=agent.id)
    else:
        walk.step(f"{agent.id} is {why}; deputy {deputy.id} is {cannot}, not taken")
    _fell_back(walk, _FALLBACK[took], first)
    return None


def _fell_back(walk: Walk, reason: ReasonName, first: bool) -> None:
    walk.fallback = reason if first else walk.fallback or reason


def _team(
    team_id: str, reason: ReasonName, facts: Facts, now: datetime, walk: Walk, said: str
) -> Verdict:
    """``team_id`` while it is open; when closed, its after-hours team if that one is open
    (reason ``after_hours`` or ``holiday``), else the team itself with when it opens."""
    team = facts.teams.get(team_id)
    schedule = team.schedule if team is not None else None
    status = schedule.status(now) if schedule is not None else None
    if team is None or schedule is None or status is None or status.open:
        walk.step(said)
        return Verdict("team", team_id, reason)
    closed = f"{said}; team {team_id} {schedule.describe(now)}"
    other_id = team.record.after_hours
    if not other_id:
        walk.step(f"{closed}; no after-hours team, it waits there")
        return Verdict("team", team_id, reason, opens_at=status.opens_at)
    other = facts.teams.get(other_id)
    if other is not None and (other.schedule is None or other.schedule.status(now).open):
        walk.step(f"{closed}; after-hours team {other_id} takes it")
        return Verdict("team", other_id, "holiday" if status.reason == "holiday" else "after_hours")
    why = "is closed too" if other is not None else "is not in the directory"
    walk.step(f"{closed}; after-hours team {other_id} {why}, it waits there")
    return Verdict("team", team_id, reason, opens_at=status.opens_at)


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
