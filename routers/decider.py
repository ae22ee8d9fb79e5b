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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.errors import TransientError
from ingest.protocols import Decision
from ingest.schema import CustomerRef, InboundMessage, Route, utcnow
from routers import directory, state
from routers.directory import AgentRecord, CustomerRecord, TeamRecord
from routers.policy import UNVERIFIED, AgentFacts, Facts, address_team, decide
from routers.settings import RoutingSettings
from routers.store.transactions import transactions_of


@dataclass
class _Read:
    """What a batch's decisions read: customers in message order, state, agents and teams
    by id."""

    customers: list[CustomerRecord | None]
    routing: state.RoutingState = field(default_factory=state.RoutingState)
    agents: dict[str, AgentRecord | None] = field(default_factory=dict)
    teams: dict[str, TeamRecord | None] = field(default_factory=dict)


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

    async def __call__(self, message: InboundMessage) -> Decision:
        return (await self.decide_many([message]))[0]

    async def explain(self, message: InboundMessage) -> tuple[Decision, Facts]:
        return (await self.explain_many([message]))[0]

    async def decide_many(
        self, messages: Sequence[InboundMessage], *, context: bool = True
    ) -> list[Decision]:
        """Decisions in message order. ``context=False`` skips what the route itself does
        not need (recent contacts; the last agent on channels that are not sticky): a
        caller-ID answer, whose caller's context travels in the routed voice message."""
        return [decision for decision, _ in await self.explain_many(messages, context=context)]

    async def explain_many(
        self, messages: Sequence[InboundMessage], *, context: bool = True
    ) -> list[tuple[Decision, Facts]]:
        settings = self.settings  # one snapshot: a reload mid-batch changes nothing here
        try:
            read = await self._read(messages, settings, context)
            now = self._clock()
            decided: list[tuple[Route, Facts]] = []
            for index, message in enumerate(messages):
                facts = self._facts(index, read)
                decided.append((decide(message, facts, settings, now), facts))
            # read before deciding; a rule naming a team no fact had would be read here
            unread = _teams_to_dial(decided, settings) - read.teams.keys()
            teams = read.teams | await self.directory.get_teams(unread)
            targets = {r.target for r, _ in decided if r.kind == "agent" and r.target}
            agents = await self.directory.get_agents(targets - read.agents.keys())
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {type(exc).__name__}: {exc}") from exc
        agents.update(read.agents)
        answers: list[tuple[Decision, Facts]] = []
        for route, facts in decided:
            customer = facts.customer
            ref = None
            # An unproven sender (issue 13) gets the customer's team, never their context:
            # no name, no recent contacts, no customer id in the routed message or record.
            if customer is not None and route.reason != UNVERIFIED:
                recent = read.routing.recent.get(customer.id, [])
                ref = CustomerRef(
                    id=customer.id, name=customer.name, team=customer.team_id, recent=list(recent)
                )
            dial, fallback = _dials(route, teams, agents, settings)
            answers.append(
                (Decision(customer=ref, route=route, dial=dial, fallback_dial=fallback), facts)
            )
        return answers

    async def _read(
        self, messages: Sequence[InboundMessage], settings: RoutingSettings, context: bool
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
            read.routing = await self._run(
                lambda connection: state.read_routing_state(connection, ids, limit, threads)
            )
        wanted = {agent for agent, _ in read.routing.owners.values()}
        wanted |= {last.agent_id for last, _ in read.routing.last.values()}
        read.agents = await self.directory.get_agents(wanted)
        read.teams = await self.directory.get_teams(_teams_in_view(messages, read, settings))
        return read

    def _facts(self, index: int, read: _Read) -> Facts:
        customer = read.customers[index]
        if customer is None:
            return Facts(customer=None)
        team = read.teams.get(customer.team_id) if customer.team_id else None
        owner = None
        if index in read.routing.owners:
            owner_id, presence = read.routing.owners[index]
            owner = _agent_facts(owner_id, presence, read.agents.get(owner_id))
        last, last_facts = None, None
        found = read.routing.last.get(customer.id)
        if found is not None:
            last, presence = found
            last_facts = _agent_facts(last.agent_id, presence, read.agents.get(last.agent_id))
        return Facts(
            customer=customer,
            thread_owner=owner,
            last_agent=last_facts,
            last_agent_at=last.at if last else None,
            team=team,
        )


def _thread_refs(message: InboundMessage) -> list[str]:
    """The Message-IDs an email answers, newest first; none for other channels."""
    if message.channel != "email" or message.thread is None:
        return []
    refs = [message.thread.in_reply_to or "", *reversed(message.thread.references)]
    return refs if any(refs) else []


def _agent_facts(agent_id: str, presence: str, record: AgentRecord | None) -> AgentFacts:
    if record is None:  # the agent left the directory: treat as deactivated
        return AgentFacts(id=agent_id, team_id=None, active=False, presence="offline")
    return AgentFacts(id=record.id, team_id=record.team_id, active=record.active, presence=presence)


def _teams_in_view(
    messages: Sequence[InboundMessage], read: _Read, settings: RoutingSettings
) -> set[str]:
    """The teams a batch's routes may name: each customer's own, else the address's, and
    the default team."""
    teams = {settings.default_team} if settings.default_team else set()
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


def _dials(
    route: Route,
    teams: dict[str, TeamRecord | None],
    agents: dict[str, AgentRecord | None],
    settings: RoutingSettings,
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
    return team_dial(route.target), None
