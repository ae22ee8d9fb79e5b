"""The Twilio channel: the SMS, WhatsApp and Voice webhooks (signed by Twilio, kept through
the spool), SMS and WhatsApp replies through Twilio's API when an account and a sender
number are set."""

from collections.abc import Mapping, Sequence

from config.registry import Shared
from config.settings import Settings
from connectors.twilio import TwilioRoutes, TwilioSmsSender, TwilioWhatsAppSender
from ingest.bus import Bus
from ingest.protocols import Channel, CheckRow, HttpRoutes, Intake, Sender
from ingest.schema import OutboundFailed
from ingest.topology import EVENTS


class BusEvents:
    """The ``EventSink`` over the bus: events on ``omniroute.events``, keyed by type."""

    def __init__(self, bus: Bus) -> None:
        self._bus = bus

    async def emit(self, event: OutboundFailed, *, message_id: str) -> None:
        await self._bus.publish(EVENTS, event.type, event, message_id=message_id)


class TwilioChannel:
    name = "twilio"

    def __init__(self, settings: Settings, shared: Shared) -> None:
        self._settings = settings
        self._shared = shared
        self._senders: tuple[TwilioSmsSender, ...] = ()

    def _can_send(self) -> bool:
        twilio = self._settings.twilio
        return bool(twilio.account_sid and twilio.auth_token and twilio.from_number)

    def intake(self) -> Mapping[str, Intake]:
        return {}

    def routes(self) -> Sequence[HttpRoutes]:
        settings, shared = self._settings, self._shared
        routes = TwilioRoutes(
            settings=settings.twilio,
            http=settings.http,
            sink=shared.spool(),
            seen=shared.seen,
            decider=shared.decider,
            events=BusEvents(shared.bus),
            metrics=shared.metrics,
            region=settings.routing.default_region,
        )
        return (HttpRoutes(routes.router),)

    def senders(self) -> Sequence[Sender]:
        if not self._can_send():
            return ()
        settings = self._settings
        self._senders = tuple(
            kind(settings.twilio, settings.http, region=settings.routing.default_region)
            for kind in (TwilioSmsSender, TwilioWhatsAppSender)
        )
        return self._senders

    async def check(self) -> list[CheckRow]:
        why = "webhook signatures checked against " + (
            self._settings.http.public_url or "the request URL (set http.public_url behind a proxy)"
        )
        sending = "; SMS and WhatsApp replies enabled" if self._can_send() else ""
        return [("twilio", True, why + sending)]

    async def reload(self, settings: Settings) -> None:
        """Nothing live: ``[twilio]`` needs a restart (see the registry)."""

    async def close(self) -> None:
        for sender in self._senders:
            await sender.close()


def build(settings: Settings, shared: Shared) -> Channel[Settings]:
    return TwilioChannel(settings, shared)
