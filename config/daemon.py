"""The daemon: opens the directory and the broker, starts every enabled component under one
``asyncio.TaskGroup`` in dependency order, and drains them in reverse on SIGTERM/SIGINT.

Stop order (DESIGN.md "SIGTERM drains"): readiness goes 503 and the pollers stop; HTTP
keeps answering (``/readyz`` 503) for ``READINESS_GRACE`` so a load balancer sees it, then
stops; the workers finish what is in flight; all within ``shutdown_timeout``. A second
signal or the deadline cancels what is left, and the broker redelivers anything not acked.

SIGHUP reloads what can change live (log level, routing, mailboxes) and reopens the
directory pool; a configuration that does not load is refused and the old one kept.

Readiness (issue 19): ``/readyz`` and systemd's READY=1 read the same ``Health``. The
directory, the broker and every worker are registered before HTTP listens, so each is
"starting" until it reports: the directory once migrated, the broker once the topology is
declared on a live connection, a worker once it consumes. READY=1 is sent the first time
those core facts are ready (``/readyz`` also waits for the mailboxes and the X account).
"""

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Awaitable
from pathlib import Path

import structlog

from config import components, registry
from config.logging import configure as configure_logging
from config.notify import Notifier, watchdog_interval
from config.settings import Settings, load_settings
from config.supervise import supervise
from ingest.amqp import redact_url
from ingest.backoff import Backoff, pause
from ingest.bus import Bus
from ingest.errors import AuthError, ConfigError, TransientError
from ingest.health import Health
from ingest.metrics import Metrics
from routers.store.engine import create_engine, migrate
from routers.store.lease import lease_for

log = structlog.get_logger("omniroute.daemon")

#: seconds /readyz answers 503 before the HTTP port closes (capped at shutdown_timeout / 10)
READINESS_GRACE = 1.0
MIGRATE_LEASE = "directory:migrate"
#: components whose failure the watchdog reports (connectors fail alone, see _alive)
CORE = ("directory", *registry.CORE)
#: settings a running process cannot take over live: a reload that changes them says so
#: (the core's and each channel's, from the registry)
RESTART_ONLY = registry.RESTART_ONLY


class Daemon:
    def __init__(self, settings: Settings, config_file: Path | None) -> None:
        self.settings = settings
        #: what this process runs: a reload cannot change the restart-only keys, so its
        #: warning compares with these, not with the last file loaded (issue 17)
        self._running = settings
        self._config_file = config_file
        self.health = Health()
        self.metrics = Metrics()
        self._stop = asyncio.Event()
        self._stop_intake = asyncio.Event()
        self._stop_workers = asyncio.Event()
        self._stop_http = asyncio.Event()
        self._reloading = asyncio.Lock()
        self._signals = 0
        self._notifier = Notifier()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wiring: components.Wiring | None = None
        #: READY=1 was sent: the start-up is over for systemd (reloads may notify from then)
        self._announced = False

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, main)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self._notifier.close()

    def _on_stop_signal(self, main: "asyncio.Task[int]") -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("daemon.stopping", timeout=self.settings.shutdown_timeout)
            self._notifier.notify("STOPPING=1", "STATUS=draining")
            self._stop.set()
        else:
            log.warning("daemon.forced_stop")
            main.cancel()

    def _on_reload(self) -> None:
        task = asyncio.create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        async with self._reloading:  # two quick SIGHUPs apply one after the other
            monotonic = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self._reload_notify(
                "RELOADING=1", f"MONOTONIC_USEC={monotonic}", "STATUS=reloading configuration"
            )
            try:
                new = await asyncio.to_thread(load_settings, self._config_file)
                if self._wiring is not None:
                    await self._wiring.check_rules(new)  # teams the directory lacks
            except ConfigError as exc:
                log.error("daemon.reload_refused", error=str(exc))
                self._reload_notify("READY=1", "STATUS=reload refused: old configuration kept")
                return
            old = self.settings
            # what this process runs was chosen at start (``--component``), not by the file
            new = new.model_copy(update={"components": old.components})
            running = self._running
            restart = [
                key
                for key in RESTART_ONLY
                if registry.value(new, key) != registry.value(running, key)
            ]
            if restart:
                log.warning("daemon.reload_needs_restart", keys=restart)
            configure_logging(
                fmt=new.log.format, level=new.log.level, redact_identities=new.log.redact
            )
            try:
                if self._wiring is not None:
                    await self._wiring.reload(new)
            except Exception:  # a half-applied reload must not end the daemon
                log.exception("daemon.reload_failed")
                self._reload_notify("READY=1", "STATUS=running (reload failed, see log)")
                return
            self.settings = new
            log.info("daemon.reloaded", level=new.log.level)
            self._reload_notify("READY=1", "STATUS=running (configuration reloaded)")

    def _reload_notify(self, *states: str) -> None:
        """A reload's RELOADING=1 and READY=1 once started; before, the READY=1 to come is
        the start's (``_announce``), so only the status."""
        if self._announced:
            self._notifier.notify(*states)
        else:
            self._notifier.notify(*(s for s in states if s.startswith("STATUS=")))

    async def _run(self) -> int:
        settings = self.settings
        self._notifier.notify("STATUS=migrating the directory")
        if not await self._migrate():
            return 0
        engine = create_engine(settings.directory_url, settings.directory)
        self.health.register("directory")
        self.health.set("directory", "up")  # it answered: the migration ran on it
        self.health.register("broker")  # "starting" until the topology is declared
        bus = Bus(
            settings.amqp_url.get_secret_value(),
            settings.bus,
            name="omniroute",
            health=self.health,
            metrics=self.metrics,
        )
        try:
            # Built before the broker answers: HTTP, the spool and pollers start at once, so a
            # restart during a broker outage still takes webhooks in (they spool).
            self._wiring = components.Wiring(settings, self.health, bus, engine, self.metrics)
            await self._wiring.check_rules(settings)  # issue 20: exit 2 in one line
            plan = self._wiring.plan()
            return await self._serve(plan, bus)
        finally:
            if self._wiring is not None:
                await self._wiring.close()
            await bus.close()
            await engine.dispose()

    async def _migrate(self) -> bool:
        """Migrate under a lease, so that instances started together on one PostgreSQL
        directory do not race each other's DDL; False if stopped while waiting."""
        lease = lease_for(self.settings.directory_url, self.settings.state_dir)
        waiting = False
        try:
            while not self._stop.is_set():
                try:
                    held = await lease.acquire(MIGRATE_LEASE)
                except TransientError:
                    held = None  # migrate() below reports an unreachable directory properly
                    break
                if held is not None:
                    break
                if not waiting:
                    log.info("daemon.migration_waiting")
                    waiting = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._stop.wait()
            if self._stop.is_set():
                return False
            await migrate(self.settings.directory_url)
            return True
        finally:
            await lease.close()

    async def _open_bus(self, bus: Bus) -> bool:
        """Connect, retrying with backoff while the broker is away; False if stopped first."""
        backoff = Backoff(1.0, 30.0)
        waiting = False
        url = redact_url(self.settings.amqp_url.get_secret_value())
        while not self._stop.is_set():
            try:
                await bus.open()
                self.health.set("broker", "up")
                if waiting:
                    log.info("daemon.broker_connected", url=url)
                return True
            except AuthError:
                raise
            except TransientError as exc:
                if not waiting:
                    log.warning("daemon.broker_unreachable", url=url, error=str(exc))
                    waiting = True
                self.health.set("broker", "down", "unreachable")
            await pause(backoff.next(), self._stop)
        return False

    async def _serve(self, plan: components.Plan, bus: Bus) -> int:
        settings = self.settings
        intake: list[asyncio.Task[None]] = []
        workers: list[asyncio.Task[None]] = []
        async with asyncio.TaskGroup() as group:
            for name in plan.workers:  # "starting" until consuming: /readyz waits for them
                self.health.register(name)
            core = ("directory", "broker", *plan.workers)
            intake.append(group.create_task(self._announce(core, plan), name="readiness"))
            for name, run in plan.intake.items():
                # intake reports its own health (email.<mailbox>, twitter, the spool's probe);
                # a loop that registered nothing of its own name is "up" while it runs, and
                # never blocks /readyz
                silent = name not in self.health.components
                self.health.register(name, required=False)
                intake.append(
                    group.create_task(
                        supervise(name, run, self._stop_intake, self.health, running_is_up=silent),
                        name=name,
                    )
                )
            http: asyncio.Task[None] | None = None
            if plan.http is not None:
                http = group.create_task(plan.http(self._stop_http), name="http")
                assert plan.http_started is not None
                await _first(plan.http_started.wait(), self._stop.wait())
            self._notifier.notify("STATUS=connecting to the broker")
            if not self._stop.is_set() and await self._open_bus(bus):
                for name, run in plan.workers.items():
                    workers.append(
                        group.create_task(
                            supervise(name, run, self._stop_workers, self.health), name=name
                        )
                    )
            await self._stop.wait()
            self.health.draining = True
            try:
                async with asyncio.timeout(settings.shutdown_timeout):
                    self._stop_intake.set()
                    if http is not None:
                        await asyncio.sleep(min(READINESS_GRACE, settings.shutdown_timeout / 10))
                        self._stop_http.set()
                        intake.append(http)
                    self._notifier.notify("STATUS=draining: intake stopped")
                    await asyncio.wait(intake) if intake else None
                    self._stop_workers.set()
                    self._notifier.notify("STATUS=draining: finishing in-flight messages")
                    await asyncio.wait(workers) if workers else None
            except TimeoutError:
                log.warning("daemon.drain_timeout", timeout=settings.shutdown_timeout)
                self._stop_http.set()
                self._stop_workers.set()
                for task in [*intake, *workers, *([http] if http is not None else [])]:
                    task.cancel()
        log.info("daemon.stopped")
        return 0

    async def _announce(self, core: tuple[str, ...], plan: components.Plan) -> None:
        """READY=1, once: the first time ``Health`` finds the core ready (the directory, the
        broker, every worker consuming, no probe failing), which are ``/readyz``'s facts
        but for the mailboxes and the X account (one unreachable mailbox must not fail the
        unit's start); then the watchdog. Woken by every state change, and each second for
        the probes, which change without telling."""
        changed = asyncio.Event()

        def wake(_name: str, _state: str) -> None:
            changed.set()

        self.health.listeners.append(wake)
        try:
            while not self._stop.is_set() and not self.health.ready(only=core)[0]:
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await _first(changed.wait(), self._stop.wait())
        finally:
            self.health.listeners.remove(wake)
        if self._stop.is_set():
            return
        # what start-up built (modules, models, the app) lives as long as the process: out
        # of the collector's way, a full collection no longer walks it and stalls the loop
        # for tens of milliseconds under load
        gc.freeze()
        log.info("daemon.ready", components=sorted([*plan.workers, *plan.intake]))
        self._notifier.notify("READY=1", "STATUS=running")
        self._announced = True
        watchdog = watchdog_interval() or self.settings.watchdog_interval
        if watchdog:
            await self._watchdog(watchdog)

    def _alive(self) -> list[str]:
        """What would make a restart worth it: a core worker down, or a consumer gone while
        the broker connection is up (the silent failure). A broker that is away is not on
        this list: the bus reconnects by itself and the spool keeps webhook input, so a
        restart would only make things worse; a mailbox or X account that fails is that
        connector's own business (``/readyz`` shows it)."""
        problems = [
            f"{name}: down ({c.reason})"
            for name in CORE
            if (c := self.health.components.get(name)) is not None and c.state == "down"
        ]
        if not self.health.probe_problems("connection"):
            problems += self.health.probe_problems("consumer")
        return problems

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 from the event loop while ``_alive`` finds nothing wrong: a blocked loop
        or a silent loss of consumers gets the unit restarted by systemd."""
        status = ""
        while not self._stop.is_set():
            problems = self._alive()
            if not problems:
                self._notifier.notify("WATCHDOG=1")
            now = "unhealthy: " + "; ".join(problems)[:200] if problems else "running"
            if now != status:
                if problems:
                    log.warning("daemon.watchdog_withheld", problems=problems)
                self._notifier.notify("STATUS=" + now)
                status = now
            try:
                async with asyncio.timeout(interval):
                    await self._stop.wait()
            except TimeoutError:
                pass


async def _first(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
