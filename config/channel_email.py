"""The email channel: IMAP intake (one leased worker per mailbox), SMTP replies, and a check
that logs into each. Mailboxes added, removed or changed apply on reload."""

from collections.abc import Mapping, Sequence

from config.registry import Shared
from config.settings import Settings
from connectors.email.check import check
from connectors.email.intake import EmailConnector
from connectors.email.smtp import SmtpSender
from ingest.protocols import Channel, CheckRow, HttpRoutes, Intake, Sender


class EmailChannel:
    name = "email"

    def __init__(self, settings: Settings, shared: Shared) -> None:
        self._settings = settings
        self._shared = shared
        self._connector: EmailConnector | None = None

    def intake(self) -> Mapping[str, Intake]:
        """Nothing without mailboxes: the first one needs a restart (the worker group is
        started with the process)."""
        if not self._settings.email.mailboxes:
            return {}
        shared = self._shared
        self._connector = EmailConnector(
            self._settings.email,
            sink=shared.sink,
            cursors=shared.cursors,
            seen=shared.seen,
            health=shared.health,
            lease=shared.lease(),
            lease_retry=shared.lease_retry,
        )
        return {self.name: self._connector.run}

    def routes(self) -> Sequence[HttpRoutes]:
        return ()

    def senders(self) -> Sequence[Sender]:
        smtp = self._settings.smtp
        if smtp is None:
            return ()
        return (SmtpSender(smtp, message_id_domain=self._settings.email.message_id_domain),)

    async def check(self) -> list[CheckRow]:
        return await check(self._settings.email, self._settings.smtp)

    async def reload(self, settings: Settings) -> None:
        if self._connector is not None:
            await self._connector.reconcile(settings.email)

    async def close(self) -> None:
        """The connector closes its parse pool when ``run`` returns; SMTP opens per reply."""


def build(settings: Settings, shared: Shared) -> Channel[Settings]:
    return EmailChannel(settings, shared)
