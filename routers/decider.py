"""Reads the facts for messages and applies the policy: the one place where a decision is
made, shared by the router worker, the voice webhook, the PBX route API and
``omniroute route explain`` (they receive it as an ``ingest.protocols.Decider``).

Usage: ``decision = await DirectoryDecider(engine, routing_settings)(inbound_message)``, or
``await decider.decide_many(messages)`` for a batch: the facts of all its messages are read
with one query per kind of fact, whatever the batch size, and the routing state of the
whole batch in one unit of work (``routers.store.transactions``).

Directory lookups (customer by identity, team, agent) go through a ``DirectoryCache`` when
``cache_ttl`` > 0 (the daemon passes ``router.directory_cache_ttl``); routing state (last
agent, presence, thread owner, recent contacts) is read from the database every time. The
teams are read before deciding, with one lookup for the batch: the customers' own (a fact
the policy's rules read) and the ones a route may name when a customer has none (the
address's, ``routing.default_team``), whose dial strings the answer needs.
"""

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.errors import TransientError
from ingest.protocols import Decision
from ingest.schema import CustomerRef, InboundMessage, Route, utcnow
from routers import directory, first_response, state
from routers.availability import AgentFacts, agent_schedule, capacity_of, team_schedule
from routers.directory import AgentRecord, CustomerRecord, TeamRecord
from routers.policy import Facts, TeamFacts, address_team, decide, doubt
from routers.settings import RoutingSettings
from routers.shadow import Difference, ShadowWatch
from routers.store.routed_log import clock_team
from routers.store.transactions import transactions_of


@dataclass
class _Read:
    """What a batch's decisions read: customers in message order, state, agents and teams
    by id."""

    customers: list[CustomerRecord | None]
    routing: state.RoutingState = field(default_factory=state.RoutingState)
    agents: dict[str, AgentRecord | None] = field(default_factory=dict)
    teams: dict[str, TeamRecord | None] = field(default_factory=dict)
    team_facts: dict[str, TeamFacts] | None = None


class DirectoryDecider:
    """The ``ingest.protocols.Decider`` of omniroute: facts from the directory database."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: RoutingSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
        cache_ttl: float = 0.0,
    ) -> None:
        self._run = transactions_of(engine)
        self.settings = settings  # replaced as a whole on reload (SIGHUP)
        self._clock = clock
        self.directory = directory.DirectoryCache(self._run, cache_ttl)
        #: decides each message again with ``routing.shadow_rules`` (issue 20); the daemon
        #: sets it for the router, never for ``route explain`` or ``rules test``
        self.shadow: ShadowWatch | None = None

    async def __call__(self, message: InboundMessage) -> Decision:
        return (await self.decide_many([message]))[0]

    async def explain(self, message: InboundMessage) -> tuple[Decision, Facts]:
        return (await self.explain_many([message]))[0]

    async def decide_many(
        self,
        messages: Sequence[InboundMessage],
        *,
        context: bool = True,
        without_agents: bool = False,
    ) -> list[Decision]:
        """Decisions in message order. ``context=False`` skips what the route itself does
        not need (recent contacts; the last agent on channels that are not sticky): a
        caller-ID answer, whose caller's context travels in the routed voice message.
        ``without_agents``: decide as if nobody owned the thread or had answered the
        customer (an offer that timed out or was declined goes on to the team)."""
        explained = await self.explain_many(
            messages, context=context, without_agents=without_agents
        )
        return [decision for decision, _ in explained]

    async def explain_many(
        self,
        messages: Sequence[InboundMessage],
        *,
        context: bool = True,
        without_agents: bool = False,
    ) -> list[tuple[Decision, Facts]]:
        settings = self.settings  # one snapshot: a reload mid-batch changes nothing here
        now = self._clock()
        try:
            read = await self._read(messages, settings, context, now)
            decided: list[tuple[Route, Facts]] = []
            watch = self.shadow if context and not without_agents else None
            differences: list[Difference] = []
            taken: Counter[tuple[str, str]] = Counter()  # this batch's own assignments
            for index, message in enumerate(messages):
                facts = _facts(index, message, read, settings, taken)
                if without_agents:
                    facts = replace(facts, thread_owner=None, last_agent=None)
                route = decide(message, facts, settings, now)
                if watch is not None and (
                    diff := watch.compare(message, facts, route, settings, now)
                ):
                    differences.append(diff)
                if route.kind == "agent" and route.target:
                    taken[(route.target, message.channel)] += 1
                decided.append((route, facts))
            # read before deciding; a rule naming a team no fact had would be read here
            unread = _teams_to_dial(decided, settings) - read.teams.keys()
            teams = read.teams | await self.directory.get_teams(unread)
            targets = {r.target for r, _ in decided if r.kind == "agent" and r.target}
            agents = await self.directory.get_agents(targets - read.agents.keys())
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {type(exc).__name__}: {exc}") from exc
        agents.update(read.agents)
        if watch is not None:
            await watch.report(differences)  # logged and counted; never fails the batch
        answers: list[tuple[Decision, Facts]] = []
        for message, (route, facts) in zip(messages, decided, strict=True):
            route = _respond_by(route, message, teams, settings)
            customer = facts.customer
            ref = None
            # An unproven sender (issue 13) gets the customer's team, never their context:
            # no name, no recent contacts, no customer id in the routed message or record.
            # (whatever the reason says: a closed team's after_hours, say)
            if customer is not None and doubt(message, settings) is None:
                recent = read.routing.recent.get(customer.id, [])
                ref = CustomerRef(
                    id=customer.id, name=customer.name, team=customer.team_id, recent=list(recent)
                )
            dial, fallback = _dials(route, teams, agents, settings, facts.teams.get)
            answers.append(
                (Decision(customer=ref, route=route, dial=dial, fallback_dial=fallback), facts)
            )
        return answers

    async def _read(
        self,
        messages: Sequence[InboundMessage],
        settings: RoutingSettings,
        context: bool,
        now: datetime,
    ) -> _Read:
        region = settings.default_region
        read = _Read(await self.directory.find_customers([m.sender for m in messages], region))
        stateful: set[str] = set()
        threads: dict[int, list[str]] = {}
        for index, (message, customer) in enumerate(zip(messages, read.customers, strict=True)):
            if customer is None:
                continue
            if context or message.channel in settings.sticky_channels:
                stateful.add(customer.id)
            refs = _thread_refs(message)
            if refs:
                threads[index] = refs
        if stateful or threads:
            ids, limit = sorted(stateful), settings.recent_contacts if context else 0
            since = now - settings.load_window
            read.routing = await self._run.read(
                lambda connection: state.read_routing_state(connection, ids, limit, threads, since)
            )
        found = read.routing
        wanted = set(found.owners.values()) | {last.agent_id for last in found.last.values()}
        read.agents = await self.directory.get_agents(wanted | set(found.deputies.values()))
        teams = _teams_in_view(messages, read, settings)
        teams |= {a.team_id for a in read.agents.values() if a is not None and a.team_id}
        read.teams = await self.directory.get_teams(teams)
        # a closed team hands over to its after-hours team: read those too, before deciding
        after = {t.after_hours for t in read.teams.values() if t is not None and t.after_hours}
        if after - read.teams.keys():
            read.teams |= await self.directory.get_teams(after - read.teams.keys())
        return read


def _facts(
    index: int,
    message: InboundMessage,
    read: _Read,
    settings: RoutingSettings,
    taken: Counter[tuple[str, str]],
) -> Facts:
    customer = read.customers[index]
    if customer is None:
        return Facts(customer=None, teams=_team_facts(read, settings))
    team = read.teams.get(customer.team_id) if customer.team_id else None
    owner_id = read.routing.owners.get(index)
    owner = _agent_facts(owner_id, message.channel, read, settings, taken) if owner_id else None
    last = read.routing.last.get(customer.id)
    last_facts = (
        _agent_facts(last.agent_id, message.channel, read, settings, taken) if last else None
    )
    return Facts(
        customer=customer,
        thread_owner=owner,
        last_agent=last_facts,
        last_agent_at=last.at if last else None,
        team=team,
        teams=_team_facts(read, settings),
    )


def _team_facts(read: _Read, settings: RoutingSettings) -> dict[str, TeamFacts]:
    if read.team_facts is None:  # the same for every message of the batch
        read.team_facts = {
            tid: TeamFacts(team, team_schedule(team, settings.timezone))
            for tid, team in read.teams.items()
            if team is not None
        }
    return read.team_facts


def _agent_facts(
    agent_id: str,
    channel: str,
    read: _Read,
    settings: RoutingSettings,
    taken: Counter[tuple[str, str]],
    *,
    deputy: bool = True,
) -> AgentFacts:
    """The agent as the policy sees them for a message on ``channel``: presence, calendar,
    load against capacity there, and (one level only) their deputy."""
    record = read.agents.get(agent_id)
    if record is None:  # the agent left the directory: treat as deactivated
        return AgentFacts(id=agent_id, team_id=None, active=False, presence="offline")
    presence = read.routing.presence.get(agent_id, state.AVAILABLE)
    team = read.teams.get(record.team_id) if record.team_id else None
    stand_in = read.routing.deputies.get(agent_id) if deputy else None
    return AgentFacts(
        id=record.id,
        team_id=record.team_id,
        active=record.active,
        presence=presence.status,
        until=presence.until,
        schedule=agent_schedule(record, team, settings.timezone),
        load=read.routing.loads.get((agent_id, channel), 0) + taken[(agent_id, channel)],
        capacity=capacity_of(record.capacity).get(channel),
        deputy=_agent_facts(stand_in, channel, read, settings, taken, deputy=False)
        if stand_in
        else None,
    )


def _thread_refs(message: InboundMessage) -> list[str]:
    """The Message-IDs an email answers, newest first; none for other channels."""
    if message.channel != "email" or message.thread is None:
        return []
    refs = [message.thread.in_reply_to or "", *reversed(message.thread.references)]
    return refs if any(refs) else []


def _teams_in_view(
    messages: Sequence[InboundMessage], read: _Read, settings: RoutingSettings
) -> set[str]:
    """The teams a batch's routes may name: each customer's own, else the address's, and
    the default team."""
    teams = {settings.default_team} if settings.default_team else set()
    teams |= settings.topics.teams  # issue 20: a topic rule's team, with its calendar
    if settings.shadow is not None:
        teams |= settings.shadow.topics.teams
    for message, customer in zip(messages, read.customers, strict=True):
        team = customer.team_id if customer else None
        if not team:
            team = address_team(message, settings)
        if team:
            teams.add(team)
    return teams


def _teams_to_dial(decided: list[tuple[Route, Facts]], settings: RoutingSettings) -> set[str]:
    teams: set[str] = set()
    for route, _ in decided:
        if route.target is None:
            if settings.default_team:
                teams.add(settings.default_team)
        elif route.kind == "agent":
            if route.fallback_team:
                teams.add(route.fallback_team)
        else:
            teams.add(route.target)
    return teams


#: how far back a message's ``received_at`` may start its first-response clock
_CLOCK_LOOKBACK = timedelta(days=7)


def _respond_by(
    route: Route,
    message: InboundMessage,
    teams: dict[str, TeamRecord | None],
    settings: RoutingSettings,
) -> Route:
    """The route with its first answer's due time, when its team sets one (issue 16). The
    clock runs from when omniroute took the message in (``received_at``), so time spent in
    the spool or a queue during an outage counts; a publisher's ``received_at`` in the
    future, or more than ``_CLOCK_LOOKBACK`` back, counts from the decision instead."""
    team_id = clock_team(route)
    team = teams.get(team_id) if team_id else None
    if team is None or not team.first_response:
        return route
    start = message.received_at
    if not route.decided_at - _CLOCK_LOOKBACK <= start <= route.decided_at:
        start = route.decided_at
    schedule = team_schedule(team, settings.timezone)
    due = first_response.respond_by(team, schedule, message.channel, start)
    return route if due is None else route.model_copy(update={"respond_by": due})


def _dials(
    route: Route,
    teams: dict[str, TeamRecord | None],
    agents: dict[str, AgentRecord | None],
    settings: RoutingSettings,
    calendar: Callable[[str], TeamFacts | None],
) -> tuple[str | None, str | None]:
    """Dial strings for voice: the agent's with the team's as fallback, or the team's."""

    def team_dial(team_id: str | None) -> str | None:
        team = teams.get(team_id) if team_id else None
        return team.dial if team else None

    if route.target is None:
        return team_dial(settings.default_team), None
    if route.kind == "agent":
        agent = agents.get(route.target)
        return (agent.dial if agent else None), team_dial(route.fallback_team)
    team = teams.get(route.target)
    if team is not None and team.after_hours_dial and _closed(calendar(route.target), route):
        return team.after_hours_dial, None  # nobody on call: the recorded message
    return team_dial(route.target), None


def _closed(team: TeamFacts | None, route: Route) -> bool:
    """Whether the team a route names is closed at the decision's time (its after-hours team
    was closed too, or it has none); a team that never opens has no ``opens_at``."""
    if route.opens_at is not None:
        return True
    schedule = team.schedule if team is not None else None
    return schedule is not None and not schedule.status(route.decided_at).open
