"""The email channel's intake: one supervised worker per IMAP mailbox, each draining its
mailbox through ``MailIntake`` (``connectors.email.batch``: the invariants of what is
taken, flagged and never lost are written there).

With a lease, a worker polls its mailbox only while it holds ``imap:<name>``. Every IMAP
and SMTP await runs under a deadline.
"""

import asyncio

import structlog

from connectors.email.batch import MailIntake, cursor_key
from connectors.email.imap import ImapSession
from connectors.leasing import LeaseKeeper
from connectors.settings import EmailSettings, MailboxSettings
from ingest.backoff import Backoff, pause
from ingest.errors import AuthError, ConfigError, TransientError
from ingest.health import Health
from ingest.protocols import CursorStore, InboundBatchSink, Lease, SeenStore

log = structlog.get_logger("omniroute.email")


class EmailConnector:
    """One supervised aioimaplib worker per mailbox, feeding an ``InboundSink``.

    ``run(stop)`` is the daemon's loop; ``drain()`` drains every mailbox once and
    returns how many mails it submitted (tests and ``omniroute`` one-shot use). With a
    ``lease``, a worker polls its mailbox only while it holds ``imap:<name>``; otherwise it
    is on "standby" and tries again every ``lease_retry`` seconds. ``reconcile()`` applies
    mailboxes added, removed or changed while ``run`` goes on (SIGHUP)."""

    name = "email"

    def __init__(
        self,
        settings: EmailSettings,
        *,
        sink: InboundBatchSink,
        cursors: CursorStore,
        seen: SeenStore,
        health: Health,
        lease: Lease | None = None,
        lease_retry: float = 3.0,
    ) -> None:
        self._settings = settings
        self._intake = MailIntake(settings, sink=sink, cursors=cursors, seen=seen)
        self._health = health
        self._lease = lease
        self._lease_retry = lease_retry
        self._group: asyncio.TaskGroup | None = None
        self._workers: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        for box in settings.mailboxes:
            health.register(self.component(box))

    @staticmethod
    def component(box: MailboxSettings) -> str:
        """The mailbox's name in ``Health`` (and so in ``/readyz``)."""
        return "email." + box.name

    async def run(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for box in self._settings.mailboxes:
                    self._start_worker(box)
                try:
                    await stop.wait()
                finally:
                    self._group = None
                    for _task, box_stop in self._workers.values():
                        box_stop.set()
        finally:
            self._workers.clear()
            await self._intake.close()

    def _start_worker(self, box: MailboxSettings) -> None:
        assert self._group is not None
        box_stop = asyncio.Event()
        task = self._group.create_task(self._supervise(box, box_stop), name="email:" + box.name)
        self._workers[box.name] = (task, box_stop)

    async def reconcile(self, settings: EmailSettings) -> None:
        """Start added mailboxes, stop removed ones, restart changed ones (a new password);
        the others go on untouched. A stopped worker finishes its batch first."""
        old = {box.name: box for box in self._settings.mailboxes}
        new = {box.name: box for box in settings.mailboxes}
        await self._intake.reconfigure(settings)
        self._settings = settings
        for name, box in old.items():
            if new.get(name) == box:
                continue
            worker = self._workers.pop(name, None)
            if worker is not None:
                task, box_stop = worker
                box_stop.set()
                try:
                    async with asyncio.timeout(box.timeout * 2):
                        await asyncio.shield(task)
                except TimeoutError:
                    task.cancel()
            if name not in new:
                self._health.forget(self.component(box))
                log.info("email.mailbox_removed", mailbox=name)
        for name, box in new.items():
            if old.get(name) == box:
                continue
            self._health.register(self.component(box))
            event = "email.mailbox_changed" if name in old else "email.mailbox_added"
            log.info(event, mailbox=name)
            if self._group is not None:
                self._start_worker(box)

    async def _supervise(self, box: MailboxSettings, stop: asyncio.Event) -> None:
        """Poll the mailbox while this process holds its lease (always, without a lease)."""
        if self._lease is None:
            await self._poll_loop(box, stop)
            return
        structlog.contextvars.bind_contextvars(connector="email", mailbox=box.name)
        keeper = LeaseKeeper(
            self._lease,
            cursor_key(box.name),
            health=self._health,
            component=self.component(box),
            down=lambda reason: self._down(box, reason),
            log=log.bind(mailbox=box.name),
            prefix="email",
            retry=self._lease_retry,
        )
        await keeper.serve(stop, lambda serving: self._poll_loop(box, serving))

    async def drain(self) -> int:
        """Take what is waiting in every mailbox, then return; errors are raised."""
        taken = 0
        try:
            for box in self._settings.mailboxes:
                session = await ImapSession.open(box)
                try:
                    self._up(box)
                    taken += await self._intake.drain(box, session)
                finally:
                    await session.close()
        finally:
            await self._intake.close()
        return taken

    async def _poll_loop(self, box: MailboxSettings, stop: asyncio.Event) -> None:
        """Reconnect with capped exponential backoff and jitter; stop on what retrying
        cannot fix (refused credentials, no STARTTLS) and say so once."""
        structlog.contextvars.bind_contextvars(connector="email", mailbox=box.name)
        backoff = Backoff(box.backoff_initial, box.backoff_max)
        while not stop.is_set():
            try:
                session = await ImapSession.open(box)
            except Exception as exc:
                if self._failed(box, exc):
                    return
            else:
                backoff.reset()
                try:
                    await self._serve(box, session, stop)
                except Exception as exc:
                    if self._failed(box, exc):
                        return
                finally:
                    await session.close()
            if stop.is_set():
                break
            await pause(backoff.next(), stop)
        if self._health.set(self.component(box), "stopped"):
            log.info("email.mailbox_stopped")

    async def _serve(self, box: MailboxSettings, session: ImapSession, stop: asyncio.Event) -> None:
        self._up(box)
        while not stop.is_set():
            await self._intake.drain(box, session)
            if stop.is_set():
                return
            await session.wait_for_news(stop)

    def _failed(self, box: MailboxSettings, exc: Exception) -> bool:
        """Mark the mailbox down; True for what retrying cannot fix (refused credentials,
        no STARTTLS). A bug must not end the mailbox: it is logged and backed off."""
        if isinstance(exc, AuthError | ConfigError):
            self._down(box, str(exc), final=True)
            return True
        if isinstance(exc, TransientError):
            self._down(box, str(exc))
        else:
            log.error("email.worker_bug", exc_info=exc)
            self._down(box, f"bug: {type(exc).__name__}: {exc}")
        return False

    def _up(self, box: MailboxSettings) -> None:
        if self._health.set(self.component(box), "up"):
            log.info("email.mailbox_up", mailbox=box.name)

    def _down(self, box: MailboxSettings, reason: str, *, final: bool = False) -> None:
        if self._health.set(self.component(box), "down", reason):
            log.warning("email.mailbox_down", mailbox=box.name, reason=reason, retrying=not final)
