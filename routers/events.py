"""Learns from the ticket system: ``agent.replied`` teaches who answered whom,
``agent.status`` who is available, ``customer.unstick`` whose last agent to forget.
Consumes ``omniroute.events``.

Nothing is believed unchecked (``routers.trust``): an event from a publisher outside
``events.trusted_publishers``, dated too far ahead, naming an agent the directory does not
have, or an ``agent.replied`` that names no customer and no thread, is dead-lettered.
"""

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import TypeAdapter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from ingest.bus import Bus
from ingest.consume import QueueWorker
from ingest.consumers import Consumer, Needs, QueueConsumer
from ingest.errors import RefusedError, TransientError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import (
    AgentReplied,
    AgentStatus,
    AssignmentAccepted,
    AssignmentClosed,
    AssignmentDeclined,
    CustomerUnstick,
    Event,
    utcnow,
)
from ingest.topology import EVENTS_QUEUE
from routers import directory, state
from routers.settings import EventsSettings, RouterSettings, RoutingSettings
from routers.store.engine import sessionmaker
from routers.trust import check_agent, check_customer, check_publisher, check_time

log = structlog.get_logger("omniroute.events")
#: what an assignment event changes, and the log event that says so
_ASSIGNMENT: dict[
    str, tuple[Callable[[AsyncSession, str, str, datetime], Awaitable[bool]], str]
] = {
    "assignment.accepted": (state.accept_offer, "events.offer_accepted"),
    "assignment.declined": (state.decline_offer, "events.offer_declined"),
    "assignment.closed": (state.close_assignment, "events.assignment_closed"),
}
#: the longest absence an ``agent.status`` may announce with ``until``
MAX_AWAY = timedelta(days=366)
EVENTS: TypeAdapter[Event] = TypeAdapter(Event)


class EventsWorker(QueueWorker):
    name = "events"
    queue = EVENTS_QUEUE

    def __init__(
        self,
        *,
        bus: Bus,
        engine: AsyncEngine,
        routing: RoutingSettings,
        settings: RouterSettings,
        health: Health,
        metrics: Metrics | None = None,
        trust: EventsSettings | None = None,
    ) -> None:
        super().__init__(bus, prefetch=settings.prefetch, health=health, metrics=metrics)
        self._sessions = sessionmaker(engine)
        self.routing = routing
        #: replaced as a whole on reload, like ``routing``
        self.trust = trust or EventsSettings()
        self._settings = settings
        #: called when an event made an offer due now (a decline): the timer worker's nudge
        self.on_due: Callable[[], None] | None = None

    def _consumer_for(
        self, needs: Needs, channel: AbstractChannel, queue: AbstractQueue
    ) -> QueueConsumer[Any]:
        return Consumer(needs, channel, queue, self.handle)

    async def handle(self, delivery: AbstractIncomingMessage) -> None:
        trust = self.trust
        check_publisher(trust, delivery.user_id, self._bus.user)
        event = EVENTS.validate_json(delivery.body)
        check_time(trust, event.at)
        declined = False
        try:
            async with self._sessions.begin() as session:
                if isinstance(event, AgentReplied):
                    await self._replied(session, event)
                elif isinstance(event, AgentStatus):
                    await self._status(session, event)
                elif isinstance(event, CustomerUnstick):
                    await check_customer(session, event.customer_id)
                    forgot = await state.forget_last_agent(session, event.customer_id, event.at)
                    log.info("events.customer_unstick", customer=event.customer_id, forgot=forgot)
                elif isinstance(event, AssignmentAccepted | AssignmentDeclined | AssignmentClosed):
                    # one agent's one message; outbound.* events are omniroute's own news
                    await check_agent(session, event.agent_id)
                    change, said = _ASSIGNMENT[event.type]
                    changed = await change(session, event.message_id, event.agent_id, event.at)
                    declined = changed and isinstance(event, AssignmentDeclined)
                    log.info(
                        said, agent_id=event.agent_id, message_id=event.message_id, was_open=changed
                    )
        except SQLAlchemyError as exc:
            raise TransientError(f"directory database: {exc}") from exc
        if declined and self.on_due is not None:
            self.on_due()  # committed: the timer worker finds the offer due now

    async def _status(self, session: AsyncSession, event: AgentStatus) -> None:
        if event.until is not None and event.until > utcnow() + MAX_AWAY:
            # a year and more is no absence but a pinned state (or a hostile one)
            raise RefusedError("future_timestamp", f"until more than {MAX_AWAY.days} days ahead")
        await check_agent(session, event.agent_id)
        if event.deputy is not None:
            await check_agent(session, event.deputy)
            if event.deputy == event.agent_id:
                raise RefusedError("unknown_agent", "an agent cannot be their own deputy")
        await state.set_presence(
            session,
            event.agent_id,
            event.status,
            event.at,
            until=event.until,
            deputy=event.deputy,
        )
        log.info(
            "events.agent_status",
            agent_id=event.agent_id,
            status=event.status,
            until=event.until.isoformat() if event.until else None,
            deputy=event.deputy,
        )

    async def _replied(self, session: AsyncSession, event: AgentReplied) -> None:
        await check_agent(session, event.agent_id)
        customer_id = event.customer_id
        if customer_id is not None:
            await check_customer(session, customer_id)
        elif event.identity is not None:
            found = await directory.find_customer(
                session, event.identity, self.routing.default_region
            )
            customer_id = found.id if found else None
        if customer_id is None and not event.message_id:
            # nobody to remember the agent for: the ticket system's data is wrong, say so
            raise RefusedError(
                "unknown_customer",
                "no customer_id, no identity in the directory, and no message_id",
            )
        await state.record_reply(
            session,
            agent_id=event.agent_id,
            customer_id=customer_id,
            channel=event.channel,
            at=event.at,
            message_id=event.message_id,
        )
        log.info("events.agent_replied", agent_id=event.agent_id, customer=customer_id)
