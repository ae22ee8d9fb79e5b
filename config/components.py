"""The explicit table of what runs: which classes exist, what each receives, and which are
enabled. A connector's module (and its third-party library) is imported only when that
connector is configured and selected, never as a side effect of importing this module.

| component  | runs                                   | needs                                   |
|------------|----------------------------------------|-----------------------------------------|
| router     | routers.worker.RouterWorker            | always                                  |
| events     | routers.events.EventsWorker            | always                                  |
| dispatcher | routers.dispatcher.OutboundDispatcher  | always; senders of configured channels  |
| webhooks   | Twilio webhooks, /v1/route, the spool  | twilio.auth_token and/or api.token      |
| email      | connectors.email.EmailConnector        | [[email.mailboxes]]                     |
| twitter    | connectors.twitter.TwitterConnector    | [twitter]                               |

Every process serves /healthz, /readyz and /metrics on ``http.host:http.port``.

Pollers (email, twitter) receive a lease (``routers.lease``): an advisory lock on a
PostgreSQL directory, a lock file in ``state_dir/leases`` on SQLite, so that each mailbox
and X account is polled by one live instance however many run.
"""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import APIRouter
from sqlalchemy.ext.asyncio import AsyncEngine

from config.settings import Settings
from ingest.bus import Bus
from ingest.health import Health, State
from ingest.metrics import Metrics
from ingest.protocols import InboundSink, Lease, Sender
from ingest.sink import BusSink
from routers.decider import Decider
from routers.dispatcher import OutboundDispatcher
from routers.events import EventsWorker
from routers.lease import lease_for
from routers.maintenance import Pruner
from routers.store import DbCursorStore, DbSeenStore
from routers.worker import RouterWorker

if TYPE_CHECKING:
    from config.daemon import Plan
    from connectors.email import EmailConnector
    from connectors.http import FastPath

log = structlog.get_logger("omniroute.components")
#: seconds between a standby poller's attempts at the lease (with jitter): the takeover delay
LEASE_RETRY = 3.0
Runner = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


class Wiring:
    """Builds this process's components from the settings and holds them for reloads."""

    def __init__(
        self,
        settings: Settings,
        health: Health,
        bus: Bus,
        engine: AsyncEngine,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.health = health
        self.bus = bus
        self.engine = engine
        self.metrics = metrics
        self.decider = Decider(
            engine, settings.routing, cache_ttl=settings.router.directory_cache_ttl
        )
        self.cursors = DbCursorStore(engine)
        self.seen = DbSeenStore(engine)
        self.sink: InboundSink = BusSink(bus)
        self.router: RouterWorker | None = None
        self.pruner: Pruner | None = None
        self.events: EventsWorker | None = None
        self.dispatcher: OutboundDispatcher | None = None
        self.email: EmailConnector | None = None
        self._lease: Lease | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        health.listeners.append(self._on_health)

    def _on_health(self, name: str, state: State) -> None:
        self.metrics.connector_up.labels(name).set(1 if state == "up" else 0)

    def enabled(self, name: str) -> bool:
        return name in self.settings.components

    def plan(self) -> "Plan":
        from config.daemon import Plan

        plan = Plan()
        self._workers(plan)
        http_routers: list[APIRouter] = []
        fast_paths: list[FastPath] = []
        spool = None
        if self.enabled("webhooks"):
            spool, http_routers, fast_paths = self._webhooks(plan)
        if self.enabled("email") and self.settings.email.mailboxes:
            self._email(plan)
        if self.enabled("twitter") and self.settings.twitter is not None:
            self._twitter(plan)
        self._http(plan, http_routers, fast_paths, spool)
        return plan

    def _workers(self, plan: "Plan") -> None:
        settings = self.settings
        drain = settings.shutdown_timeout * 0.8
        if self.enabled("router"):
            router = self.router = RouterWorker(
                bus=self.bus,
                engine=self.engine,
                decider=self.decider,
                routing=settings.routing,
                settings=settings.router,
                health=self.health,
                metrics=self.metrics,
            )
            plan.workers["router"] = _with_drain(router.run, drain)
            # the record of routed messages is the router's: it keeps it bounded too
            self.pruner = Pruner(self.engine, settings.routing)
            plan.intake["pruner"] = self.pruner.run
        if self.enabled("events"):
            events = self.events = EventsWorker(
                bus=self.bus,
                engine=self.engine,
                routing=settings.routing,
                settings=settings.router,
                health=self.health,
                trust=settings.events,
            )
            plan.workers["events"] = _with_drain(events.run, drain)
        if self.enabled("dispatcher"):
            dispatcher = self.dispatcher = OutboundDispatcher(
                bus=self.bus,
                engine=self.engine,
                senders=self._senders(),
                routing=settings.routing,
                settings=settings.dispatch,
                health=self.health,
                metrics=self.metrics,
                trust=settings.events,
            )
            plan.workers["dispatcher"] = _with_drain(dispatcher.run, drain)

    def _senders(self) -> dict[str, Sender]:
        """The outbound sender of every configured channel."""
        settings = self.settings
        senders: dict[str, Sender] = {}
        if settings.smtp is not None:
            from connectors.email import SmtpSender

            senders["email"] = SmtpSender(
                settings.smtp, message_id_domain=settings.email.message_id_domain
            )
        twilio = settings.twilio
        if twilio.account_sid and twilio.auth_token and twilio.from_number:
            from connectors.twilio import TwilioSmsSender

            sms = TwilioSmsSender(twilio, settings.http, region=settings.routing.default_region)
            senders["sms"] = sms
            self._closers.append(sms.close)
        if settings.twitter is not None:
            from connectors.twitter_sender import TwitterSender

            x = TwitterSender(settings.twitter)
            senders["twitter"] = x
            self._closers.append(x.aclose)
        if senders:
            log.info("components.senders", channels=sorted(senders))
        return senders

    def _webhooks(self, plan: "Plan") -> tuple[Any, list[APIRouter], "list[FastPath]"]:
        from connectors.pbx import PbxRoutes
        from ingest.spool import SpooledSink

        settings = self.settings
        spool = SpooledSink(
            BusSink(self.bus), settings.state_dir / "spool", settings.spool, self.metrics
        )
        self.health.probes["spool"] = spool.probe
        plan.intake["spool"] = spool.drain
        pbx = PbxRoutes(
            settings=settings.api,
            decider=self.decider,
            sink=spool,
            metrics=self.metrics,
            region=settings.routing.default_region,
        )
        routers = [pbx.router]
        if settings.twilio.auth_token is not None:
            from connectors.twilio import twilio_router

            routers.append(
                twilio_router(
                    settings=settings.twilio,
                    http=settings.http,
                    sink=spool,
                    seen=self.seen,
                    decider=self.decider,
                    bus=self.bus,
                    metrics=self.metrics,
                    region=settings.routing.default_region,
                )
            )
        return spool, routers, [pbx.fast_path]

    def lease(self) -> Lease:
        """One lease provider for every poller of this process, closed with it."""
        if self._lease is None:
            lease = lease_for(self.settings.directory_url, self.settings.state_dir)
            self._lease = lease
            self._closers.append(lease.close)
        return self._lease

    def _email(self, plan: "Plan") -> None:
        from connectors.email import EmailConnector

        connector = self.email = EmailConnector(
            self.settings.email,
            sink=self.sink,
            cursors=self.cursors,
            seen=self.seen,
            health=self.health,
            lease=self.lease(),
            lease_retry=LEASE_RETRY,
        )
        plan.intake["email"] = connector.run

    def _twitter(self, plan: "Plan") -> None:
        from connectors.twitter import TwitterConnector

        assert self.settings.twitter is not None
        connector = TwitterConnector(
            self.settings.twitter,
            self.sink,
            self.cursors,
            self.seen,
            self.health,
            lease=self.lease(),
            lease_retry=LEASE_RETRY,
        )
        plan.intake["twitter"] = connector.run
        self._closers.append(connector.aclose)

    def _http(
        self, plan: "Plan", routers: list[APIRouter], fast_paths: "list[FastPath]", spool: Any
    ) -> None:
        from connectors.http import HttpServer, build_app

        settings = self.settings
        app = build_app(
            health=self.health,
            metrics=self.metrics,
            http=settings.http,
            routers=routers,
            fast_paths=fast_paths,
            spool=spool,
        )
        self.http = HttpServer(app, settings.http, shutdown_timeout=settings.shutdown_timeout / 3)
        plan.http = self.http.run
        plan.http_started = self.http.started

    async def reload(self, settings: Settings) -> None:
        """Apply what can change live: the routing settings (the next decision uses them),
        the events settings (a publisher's trust revoked at once), the mailboxes (added,
        removed, changed), and a fresh directory pool.

        The directory is reopened by disposing the engine's pool, not by building a new
        engine: every store holds this engine, and ``dispose()`` closes the idle
        connections and starts a new pool at once, while connections in use finish their
        transaction and are closed when returned. Leases keep their own connections.
        """
        self.settings = settings
        self.decider.settings = settings.routing
        if self.pruner is not None:
            self.pruner.routing = settings.routing
        for worker in (self.router, self.events, self.dispatcher):
            if worker is not None:
                worker.routing = settings.routing
        for checker in (self.events, self.dispatcher):
            if checker is not None:
                checker.trust = settings.events  # who is trusted changes live
        if self.email is not None:
            await self.email.reconcile(settings.email)
        await self.engine.dispose()
        self.decider.directory.clear()
        log.info("components.directory_reopened")

    async def close(self) -> None:
        for close in self._closers:
            try:
                await close()
            except Exception:  # closing must go on for the others
                log.exception("components.close_failed")


def _with_drain(run: Callable[..., Coroutine[Any, Any, None]], drain: float) -> Runner:
    async def runner(stop: asyncio.Event) -> None:
        await run(stop, drain_timeout=drain)

    return runner
