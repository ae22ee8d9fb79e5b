"""Reads the facts for one message and applies the policy: the one place where a decision is
made, shared by the router worker, the voice webhook, the PBX route API and
``omniroute route explain`` (they receive it as an ``ingest.protocols.Decider``).

Usage: ``decision = await Decider(engine, routing_settings)(inbound_message)``.

Directory lookups (customer by identity, team, agent) go through a ``DirectoryCache`` when
``cache_ttl`` > 0 (the daemon passes ``router.directory_cache_ttl``); routing state (last
agent, presence, thread owner, recent contacts) is read from the database every time.
"""

from collections.abc import Callable
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.errors import TransientError
from ingest.protocols import Decision
from ingest.schema import CustomerRef, InboundMessage, RecentContact, utcnow
from routers import directory, state
from routers.batching import Batcher
from routers.db import sessionmaker
from routers.policy import AgentFacts, Facts, decide
from routers.settings import RoutingSettings

_CustomerState = tuple[tuple[state.LastContact, str] | None, list[RecentContact]]


class Decider:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: RoutingSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
        cache_ttl: float = 0.0,
    ) -> None:
        self._sessions = sessionmaker(engine)
        self.settings = settings  # replaced as a whole on reload (SIGHUP)
        self._clock = clock
        self.directory = directory.DirectoryCache(self._sessions, cache_ttl)
        # the customer's last agent (with presence) and recent contacts, for all messages in
        # flight, in one session: every session costs a pool checkout, a ping and a rollback
        self._state: Batcher[tuple[str, int], _CustomerState] = Batcher(
            self._load_state, (None, [])
        )

    async def __call__(self, message: InboundMessage) -> Decision:
        decision, _ = await self.explain(message)
        return decision

    async def explain(self, message: InboundMessage) -> tuple[Decision, Facts]:
        settings = self.settings
        try:
            facts, recent = await self._facts(message, settings)
            now = self._clock()
            route = decide(message, facts, settings, now)
            customer_ref = None
            if facts.customer is not None:
                customer_ref = CustomerRef(
                    id=facts.customer.id,
                    name=facts.customer.name,
                    team=facts.customer.team_id,
                    recent=list(recent),
                )
            dial, fallback = await self._dial(route.kind, route.target, route.fallback_team)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {type(exc).__name__}: {exc}") from exc
        return Decision(
            customer=customer_ref, route=route, dial=dial, fallback_dial=fallback
        ), facts

    async def _facts(
        self, message: InboundMessage, settings: RoutingSettings
    ) -> tuple[Facts, list[RecentContact]]:
        """The policy's facts, and the customer's recent contacts read with them."""
        customer = await self.directory.find_customer(message.sender, settings.default_region)
        if customer is None:
            return Facts(customer=None), []
        owner = None
        if message.channel == "email" and message.thread is not None:
            refs = [message.thread.in_reply_to or "", *reversed(message.thread.references)]
            if any(refs):
                async with self._sessions() as session:
                    owner_id = await state.thread_owner(session, refs)
                    presence = await state.presence(session, owner_id) if owner_id else ""
                if owner_id is not None:
                    owner = await self._agent(owner_id, presence)
        found, recent = await self._state.get((customer.id, settings.recent_contacts))
        last, last_facts = None, None
        if found is not None:
            last, presence = found
            last_facts = await self._agent(last.agent_id, presence)
        facts = Facts(
            customer=customer,
            thread_owner=owner,
            last_agent=last_facts,
            last_agent_at=last.at if last else None,
        )
        return facts, recent

    async def _load_state(
        self, keys: list[tuple[str, int]]
    ) -> dict[tuple[str, int], _CustomerState]:
        ids = list(dict.fromkeys(customer_id for customer_id, _ in keys))
        found: dict[tuple[str, int], _CustomerState] = {}
        async with self._sessions() as session:
            last = await state.last_agents_presence(session, ids)
            for limit in {limit for _, limit in keys}:
                wanted = [customer_id for customer_id, asked in keys if asked == limit]
                recent = await state.recent_contacts_many(session, wanted, limit)
                for customer_id in wanted:
                    found[(customer_id, limit)] = (
                        last.get(customer_id),
                        recent.get(customer_id, []),
                    )
        return found

    async def _agent(self, agent_id: str, presence: str) -> AgentFacts:
        record = await self.directory.get_agent(agent_id)
        if record is None:  # the agent left the directory: treat as deactivated
            return AgentFacts(id=agent_id, team_id=None, active=False, presence="offline")
        return AgentFacts(
            id=record.id, team_id=record.team_id, active=record.active, presence=presence
        )

    async def _dial(
        self, kind: str, target: str | None, fallback_team: str | None
    ) -> tuple[str | None, str | None]:
        """Dial strings for voice: the agent's with the team's as fallback, or the team's."""
        if target is None:
            default = self.settings.default_team
            team = await self.directory.get_team(default) if default else None
            return (team.dial if team else None), None
        if kind == "agent":
            agent = await self.directory.get_agent(target)
            team = await self.directory.get_team(fallback_team) if fallback_team else None
            return (agent.dial if agent else None), (team.dial if team else None)
        team = await self.directory.get_team(target)
        return (team.dial if team else None), None
