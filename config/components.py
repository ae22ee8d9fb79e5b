"""The explicit table of what runs: which classes exist, what each receives, and which are
enabled. A connector's module (and its third-party library) is imported only when that
connector is configured and selected, never as a side effect of importing this module."""

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from config.settings import Settings
from ingest.bus import Bus
from ingest.health import Health
from ingest.protocols import Sender
from routers.decider import Decider
from routers.dispatcher import OutboundDispatcher
from routers.events import EventsWorker
from routers.worker import RouterWorker

if TYPE_CHECKING:
    from config.daemon import Plan

log = structlog.get_logger("omniroute.components")


class Wiring:
    """Builds this process's components from the settings and holds them for reloads."""

    def __init__(self, settings: Settings, health: Health, bus: Bus, engine: AsyncEngine) -> None:
        self.settings = settings
        self.health = health
        self.bus = bus
        self.engine = engine
        self.decider = Decider(engine, settings.routing)
        self.router: RouterWorker | None = None
        self.events: EventsWorker | None = None
        self.dispatcher: OutboundDispatcher | None = None

    def enabled(self, name: str) -> bool:
        return name in self.settings.components

    def senders(self) -> Mapping[str, Sender]:
        """The outbound senders of every configured channel."""
        return {}

    def plan(self) -> "Plan":
        from config.daemon import Plan

        settings = self.settings
        drain = settings.shutdown_timeout * 0.8
        plan = Plan()
        if self.enabled("router"):
            self.router = RouterWorker(
                bus=self.bus,
                engine=self.engine,
                decider=self.decider,
                routing=settings.routing,
                settings=settings.router,
                health=self.health,
            )
            router = self.router

            async def run_router(stop: asyncio.Event) -> None:
                await router.run(stop, drain_timeout=drain)

            plan.workers["router"] = run_router
        if self.enabled("events"):
            self.events = EventsWorker(
                bus=self.bus,
                engine=self.engine,
                routing=settings.routing,
                settings=settings.router,
                health=self.health,
            )
            events = self.events

            async def run_events(stop: asyncio.Event) -> None:
                await events.run(stop, drain_timeout=drain)

            plan.workers["events"] = run_events
        if self.enabled("dispatcher"):
            self.dispatcher = OutboundDispatcher(
                bus=self.bus,
                engine=self.engine,
                senders=self.senders(),
                routing=settings.routing,
                settings=settings.dispatch,
                health=self.health,
            )
            dispatcher = self.dispatcher

            async def run_dispatcher(stop: asyncio.Event) -> None:
                await dispatcher.run(stop, drain_timeout=drain)

            plan.workers["dispatcher"] = run_dispatcher
        return plan

    def reload(self, settings: Settings) -> None:
        """Apply what can change live: the routing settings (the next decision uses them)."""
        self.settings = settings
        self.decider.settings = settings.routing
        for worker in (self.router, self.events, self.dispatcher):
            if worker is not None:
                worker.routing = settings.routing
