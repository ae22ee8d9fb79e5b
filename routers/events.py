"""Learns from the ticket system: ``agent.replied`` teaches who answered whom,
``agent.status`` who is available. Consumes ``omniroute.events``."""

import asyncio

import structlog
from aio_pika.abc import AbstractIncomingMessage
from pydantic import TypeAdapter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import EVENTS_QUEUE, Bus
from ingest.errors import TransientError
from ingest.health import Health
from ingest.schema import AgentReplied, AgentStatus, Event
from routers import directory, state
from routers.db import sessionmaker
from routers.settings import RouterSettings, RoutingSettings

log = structlog.get_logger("omniroute.events")
EVENTS: TypeAdapter[Event] = TypeAdapter(Event)


class EventsWorker:
    name = "events"

    def __init__(
        self,
        *,
        bus: Bus,
        engine: AsyncEngine,
        routing: RoutingSettings,
        settings: RouterSettings,
        health: Health,
    ) -> None:
        self._bus = bus
        self._sessions = sessionmaker(engine)
        self.routing = routing
        self._settings = settings
        self._health = health

    async def run(self, stop: asyncio.Event, *, drain_timeout: float = 30.0) -> None:
        """Consume until ``stop`` is set, then finish in-flight messages and return."""
        await self._bus.consume_until(
            EVENTS_QUEUE,
            self.handle,
            stop,
            prefetch=self._settings.prefetch,
            component=self.name,
            health=self._health,
            drain_timeout=drain_timeout,
        )

    async def handle(self, delivery: AbstractIncomingMessage) -> None:
        event = EVENTS.validate_json(delivery.body)
        try:
            async with self._sessions.begin() as session:
                if isinstance(event, AgentReplied):
                    customer_id = event.customer_id
                    if customer_id is None and event.identity is not None:
                        found = await directory.find_customer(
                            session, event.identity, self.routing.default_region
                        )
                        customer_id = found.id if found else None
                    if customer_id is None and not event.message_id:
                        log.info("events.reply_unmatched", agent_id=event.agent_id)
                        return
                    await state.record_reply(
                        session,
                        agent_id=event.agent_id,
                        customer_id=customer_id,
                        channel=event.channel,
                        at=event.at,
                        message_id=event.message_id,
                    )
                    log.info("events.agent_replied", agent_id=event.agent_id, customer=customer_id)
                elif isinstance(event, AgentStatus):
                    await state.set_presence(session, event.agent_id, event.status, event.at)
                    log.info("events.agent_status", agent_id=event.agent_id, status=event.status)
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc
