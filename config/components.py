"""What this process runs: the core workers, and the channels of ``config.registry`` whose
component it runs, built by their factories from the settings and the collaborators made
here. A channel's module (and its third-party library) is imported only when that channel
is enabled, never as a side effect of importing this module.

- ``router``: ``routers.worker.RouterWorker`` and the routed-log pruner, with
  ``routers.acks.Acknowledger`` when ``[ack]`` is set;
- ``events``: ``routers.events.EventsWorker``;
- ``dispatcher``: ``routers.dispatcher.OutboundDispatcher`` with the senders of every
  enabled channel, whichever process takes that channel's input in;
- ``webhooks``, ``email``, ``twitter`` (``Entry.component``): the intake and routes of the
  registry's enabled channels of that component.

Every process serves /healthz, /readyz and /metrics on ``http.host:http.port``; the spool
exists once a channel with webhooks asks for it.

Pollers (email, twitter) receive a lease (``routers.store.lease``): an advisory lock on a
PostgreSQL directory, a lock file in ``state_dir/leases`` on SQLite, so that each mailbox
and X account is polled by one live instance however many run.
"""

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import structlog
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from config.registry import CHANNELS, Entry, Shared, enabled, load
from config.settings import Settings
from ingest.bus import Bus
from ingest.errors import ConfigError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.protocols import Channel, HttpRoutes, InboundSink, Intake, Lease, Sender
from ingest.queue_stats import QueueStats
from ingest.recent import RecentDecisions
from ingest.sink import BusSink
from routers import ack_text
from routers.acks import Acknowledger
from routers.decider import DirectoryDecider
from routers.dispatcher import OutboundDispatcher
from routers.escalations import EscalationTimers
from routers.events import EventsWorker
from routers.offers import OfferTimers
from routers.shadow import ShadowWatch
from routers.store.connector_state import DbCursorStore, DbSeenStore
from routers.store.lease import lease_for
from routers.store.maintenance import Pruner
from routers.store.transactions import transactions_of
from routers.worker import RouterWorker

if TYPE_CHECKING:
    from fastapi import APIRouter

    from ingest.spool import SpooledSink

log = structlog.get_logger("omniroute.components")
#: seconds between a standby poller's attempts at the lease (with jitter): the takeover delay
LEASE_RETRY = 3.0
#: a worker's run loop: runs until the event is set, then drains and returns
WorkerLoop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
#: what a registry entry's import string names: the channel built from the settings (it
#: takes its own sections) and the collaborators it needs
ChannelFactory = Callable[[Settings, Shared], Channel[Settings]]


@dataclass
class Plan:
    """What this process runs, split by stop order: intake first, HTTP next, workers last."""

    intake: dict[str, Intake] = field(default_factory=dict)
    workers: dict[str, WorkerLoop] = field(default_factory=dict)
    http: WorkerLoop | None = None
    http_started: asyncio.Event | None = None


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
        metrics.settings = settings.metrics
        # issue 17: readiness, component states and queue counts as of each scrape
        self.queue_stats = QueueStats(bus, metrics)  # shared with the status page
        metrics.watch(health, self.queue_stats.refresh)
        #: checked now, so that a bad template stops `omniroute run` and `check` in one line
        self.ack_templates = _ack_templates(settings)
        self.decider = DirectoryDecider(
            engine, settings.routing, cache_ttl=settings.router.directory_cache_ttl
        )
        # issue 20: with routing.shadow_rules, the router's decisions are made again with the
        # candidate rules and the differences reported (the live route never changes)
        self.decider.shadow = ShadowWatch(transactions_of(engine), metrics)
        self.cursors = DbCursorStore(engine)
        self.seen = DbSeenStore(engine)
        self.sink = BusSink(bus)  # an InboundBatchSink: the email intake publishes in batches
        self.router: RouterWorker | None = None
        self.pruner: Pruner | None = None
        self.events: EventsWorker | None = None
        self.dispatcher: OutboundDispatcher | None = None
        self.timers: OfferTimers | None = None
        self.escalations: EscalationTimers | None = None
        #: the status page's record of decisions (issue 17), kept only when it is served
        self.recent = RecentDecisions() if settings.http.status_page else None
        self._channels: dict[str, Channel[Settings]] = {}
        self._spool: SpooledSink | None = None
        self._lease: Lease | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self.shared = Shared(
            sink=self.sink,
            spool=self.spool,
            lease=self.lease,
            lease_retry=LEASE_RETRY,
            cursors=self.cursors,
            seen=self.seen,
            decider=self.decider,
            health=health,
            metrics=metrics,
            bus=bus,
        )

    def enabled(self, name: str) -> bool:
        return name in self.settings.components

    def channels(self) -> list[Channel[Settings]]:
        """Every enabled channel, built once, in the registry's order."""
        return [self._channel(entry) for entry in CHANNELS if enabled(entry, self.settings)]

    def _channel(self, entry: Entry) -> Channel[Settings]:
        channel = self._channels.get(entry.name)
        if channel is None:
            factory = cast(ChannelFactory, load(entry))
            channel = self._channels[entry.name] = factory(self.settings, self.shared)
        return channel

    def plan(self) -> Plan:
        plan = Plan()
        self._workers(plan)
        routes: list[HttpRoutes] = []
        intake: dict[str, Intake] = {}
        for entry in CHANNELS:
            if self.enabled(entry.component) and enabled(entry, self.settings):
                channel = self._channel(entry)
                routes.extend(channel.routes())
                intake.update(channel.intake())
        if self._spool is not None:
            plan.intake["spool"] = self._spool.drain
        plan.intake.update(intake)
        self._http(plan, routes)
        return plan

    def _workers(self, plan: Plan) -> None:
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
                recent=self.recent,
            )
            router.acks = self._acknowledger(settings, self.ack_templates)
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
                metrics=self.metrics,
                trust=settings.events,
            )
            plan.workers["events"] = _with_drain(events.run, drain)
        if self.enabled("dispatcher"):
            dispatcher = self.dispatcher = OutboundDispatcher(
                bus=self.bus,
                engine=self.engine,
                senders=self.senders(),
                routing=settings.routing,
                settings=settings.dispatch,
                health=self.health,
                metrics=self.metrics,
                trust=settings.events,
            )
            plan.workers["dispatcher"] = _with_drain(dispatcher.run, drain)
        if self.enabled("timers"):
            # offers and escalations: the same collaborators, one worker each
            timer_needs: dict[str, Any] = {
                "bus": self.bus,
                "engine": self.engine,
                "decider": self.decider,
                "routing": settings.routing,
                "health": self.health,
                "metrics": self.metrics,
            }
            timers = self.timers = OfferTimers(**timer_needs)
            plan.workers["timers"] = timers.run
            # nudged from this process; other processes by the NOTIFY of routers.wake
            if self.router is not None:
                self.router.on_offer = timers.nudge
            if self.events is not None:
                self.events.on_due = timers.nudge
            # issue 16: a first answer due within the worker's longest sleep (30 s) nudges
            # it; on PostgreSQL the claim's NOTIFY wakes other processes' workers too
            escalations = self.escalations = EscalationTimers(**timer_needs)
            plan.workers["escalations"] = escalations.run
            timers.recent = escalations.recent = self.recent  # re-routes on the status page
            if self.router is not None:
                self.router.on_wait = escalations.nudge

    def senders(self) -> dict[str, Sender]:
        """The outbound sender of every enabled channel, by the channel it answers on."""
        senders: dict[str, Sender] = {}
        for channel in self.channels():
            for sender in channel.senders():
                if sender.channel in senders:
                    raise ConfigError(f"two senders for channel {sender.channel}")
                senders[sender.channel] = sender
        if senders:
            log.info("components.senders", channels=sorted(senders))
        return senders

    def spool(self) -> InboundSink:
        """The webhooks' sink, made when the first channel asks: answered 200 only once the
        broker confirmed or the spool fsynced (DESIGN.md, reliability rules)."""
        if self._spool is None:
            from ingest.spool import SpooledSink

            settings = self.settings
            self._spool = SpooledSink(
                BusSink(self.bus), settings.state_dir / "spool", settings.spool, self.metrics
            )
            self.health.add_probe("spool", "spool", self._spool.probe)
        return self._spool

    def lease(self) -> Lease:
        """One lease provider for every poller of this process, closed with it."""
        if self._lease is None:
            lease = lease_for(self.settings.directory_url, self.settings.state_dir)
            self._lease = lease
            self._closers.append(lease.close)
        return self._lease

    def _http(self, plan: Plan, routes: list[HttpRoutes]) -> None:
        from connectors.http import HttpServer, build_app

        settings = self.settings
        status = [self._status_page()] if settings.http.status_page else []
        app = build_app(
            health=self.health,
            metrics=self.metrics,
            http=settings.http,
            routers=[*(r.router for r in routes), *status],
            fast_paths=[r.fast_path for r in routes if r.fast_path is not None],
            spool=self._spool,
        )
        self.http = HttpServer(app, settings.http, shutdown_timeout=settings.shutdown_timeout / 3)
        plan.http = self.http.run
        plan.http_started = self.http.started

    def _status_page(self) -> "APIRouter":
        """``/status`` (issue 17): behind ``http.status_token``, else ``api.token``; redacted
        by the logging rules as they are now (a reload may change them)."""
        from config.logging import hide_secrets, scrub
        from connectors.status import QueueDepths, StatusPage, StatusSources, from_queue_stats
        from connectors.status_html import Redaction
        from ingest.identities import redact

        token = self.settings.http.status_token or self.settings.api.token
        if token is None:
            log.warning("components.status_page_locked", fix="set http.status_token")
        redaction = Redaction(redact, scrub, hide_secrets, lambda: self.settings.log.redact)
        depths = QueueDepths(from_queue_stats(self.queue_stats, self.metrics), scrub=redaction.text)
        recent = self.recent if self.router is not None else None
        page = StatusPage(
            StatusSources(self.health, self.metrics, depths, recent),
            token=token.get_secret_value() if token else None,
            redaction=redaction,
        )
        self._closers.append(page.close)
        return page.router

    async def check_rules(self, settings: Settings) -> None:
        """Refuse, in one line, topic rules (issue 20) or other keys (``default_team``,
        ``address_teams``, a mailbox's ``team``; issue 17) naming a team the directory lacks
        (it is not at hand when the settings are read); at start and on reload. A
        directory that does not answer leaves them unchecked, with a warning."""
        from config.rules_cli import named_teams, unknown_teams

        try:
            problem = await unknown_teams(
                self.engine, settings.routing, named=named_teams(settings)
            )
        except SQLAlchemyError as exc:
            log.warning("components.rules_unchecked", error=type(exc).__name__)
            return
        if problem is not None:
            raise ConfigError(problem)

    async def reload(self, settings: Settings) -> None:
        """Apply what can change live: the routing settings (the next decision uses them),
        the events settings (a publisher's trust revoked at once), the mailboxes (added,
        removed, changed), and a fresh directory pool.

        The directory is reopened by disposing the engine's pool, not by building a new
        engine: every store holds this engine, and ``dispose()`` closes the idle
        connections and starts a new pool at once, while connections in use finish their
        transaction and are closed when returned. Leases keep their own connections.
        """
        templates = _ack_templates(settings)  # a bad template refuses the reload here
        self.settings = settings
        self.ack_templates = templates
        self.decider.settings = settings.routing
        self.metrics.settings = settings.metrics
        if self.router is not None:
            self.router.acks = self._acknowledger(settings, templates)
        if self.pruner is not None:
            self.pruner.routing = settings.routing
        for worker in (self.router, self.events, self.dispatcher, self.timers, self.escalations):
            if worker is not None:
                worker.routing = settings.routing
        for checker in (self.events, self.dispatcher):
            if checker is not None:
                checker.trust = settings.events  # who is trusted changes live
        for channel in self._channels.values():
            await channel.reload(settings)
        await self.engine.dispose()
        self.decider.directory.clear()
        log.info("components.directory_reopened")

    def _acknowledger(
        self, settings: Settings, templates: ack_text.Templates | None
    ) -> Acknowledger | None:
        """The router's acknowledgements (issue 16), only when ``[ack]`` is configured."""
        if settings.ack is None or templates is None:
            return None
        return Acknowledger(
            bus=self.bus,
            engine=self.engine,
            directory=self.decider.directory,
            settings=settings.ack,
            routing=settings.routing,
            templates=templates,
            metrics=self.metrics,
        )

    async def close(self) -> None:
        for close in [*(c.close for c in self._channels.values()), *self._closers]:
            try:
                await close()
            except Exception:  # closing must go on for the others
                log.exception("components.close_failed")


def _ack_templates(settings: Settings) -> ack_text.Templates | None:
    """The acknowledgement templates when ``[ack]`` is set, checked. ``twilio.sms_ack_text``
    answers every SMS itself: with ``[ack]`` answering SMS too, a customer's first SMS would
    get two answers, so the two together are refused."""
    if settings.ack is None:
        return None
    if settings.twilio.sms_ack_text and "sms" in settings.ack.channels:
        raise ConfigError(
            "twilio.sms_ack_text and [ack] would both answer an SMS: remove "
            "twilio.sms_ack_text ([ack] supersedes it), or leave sms out of ack.channels"
        )
    return ack_text.load(settings.ack.templates)


def _with_drain(run: Callable[..., Coroutine[Any, Any, None]], drain: float) -> WorkerLoop:
    async def draining(stop: asyncio.Event) -> None:
        await run(stop, drain_timeout=drain)

    return draining
