"""Reads the facts for one message and applies the policy: the one place where a decision is
made, shared by the router worker, the voice webhook, the PBX route API and
``omniroute route explain`` (they receive it as an ``ingest.protocols.Decider``).

Usage: ``decision = await Decider(engine, routing_settings)(inbound_message)``.
"""

from collections.abc import Callable
from datetime import datetime

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ingest.errors import TransientError
from ingest.protocols import Decision
from ingest.schema import CustomerRef, InboundMessage, utcnow
from routers import directory, state
from routers.db import sessionmaker
from routers.policy import AgentFacts, Facts, decide
from routers.settings import RoutingSettings


class Decider:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: RoutingSettings,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._sessions = sessionmaker(engine)
        self.settings = settings  # replaced as a whole on reload (SIGHUP)
        self._clock = clock

    async def __call__(self, message: InboundMessage) -> Decision:
        decision, _ = await self.explain(message)
        return decision

    async def explain(self, message: InboundMessage) -> tuple[Decision, Facts]:
        settings = self.settings
        try:
            async with self._sessions() as session:
                facts = await self._facts(session, message, settings)
                now = self._clock()
                route = decide(message, facts, settings, now)
                customer_ref = None
                if facts.customer is not None:
                    customer_ref = CustomerRef(
                        id=facts.customer.id,
                        name=facts.customer.name,
                        team=facts.customer.team_id,
                        recent=await state.recent_contacts(
                            session, facts.customer.id, settings.recent_contacts
                        ),
                    )
                dial, fallback = await self._dial(
                    session, route.kind, route.target, route.fallback_team
                )
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {type(exc).__name__}: {exc}") from exc
        return Decision(
            customer=customer_ref, route=route, dial=dial, fallback_dial=fallback
        ), facts

    async def _facts(
        self, session: AsyncSession, message: InboundMessage, settings: RoutingSettings
    ) -> Facts:
        customer = await directory.find_customer(session, message.sender, settings.default_region)
        if customer is None:
            return Facts(customer=None)
        owner = None
        if message.channel == "email" and message.thread is not None:
            refs = [message.thread.in_reply_to or "", *reversed(message.thread.references)]
            owner_id = await state.thread_owner(session, refs)
            if owner_id is not None:
                owner = await self._agent(session, owner_id)
        last = await state.last_agent(session, customer.id)
        last_facts = await self._agent(session, last.agent_id) if last else None
        return Facts(
            customer=customer,
            thread_owner=owner,
            last_agent=last_facts,
            last_agent_at=last.at if last else None,
        )

    async def _agent(self, session: AsyncSession, agent_id: str) -> AgentFacts:
        record = await directory.get_agent(session, agent_id)
        if record is None:  # the agent left the directory: treat as deactivated
            return AgentFacts(id=agent_id, team_id=None, active=False, presence="offline")
        return AgentFacts(
            id=record.id,
            team_id=record.team_id,
            active=record.active,
            presence=await state.presence(session, agent_id),
        )

    async def _dial(
        self, session: AsyncSession, kind: str, target: str | None, fallback_team: str | None
    ) -> tuple[str | None, str | None]:
        """Dial strings for voice: the agent's with the team's as fallback, or the team's."""
        if target is None:
            default = self.settings.default_team
            team = await directory.get_team(session, default) if default else None
            return (team.dial if team else None), None
        if kind == "agent":
            agent = await directory.get_agent(session, target)
            team = await directory.get_team(session, fallback_team) if fallback_team else None
            return (agent.dial if agent else None), (team.dial if team else None)
        team = await directory.get_team(session, target)
        return (team.dial if team else None), None
