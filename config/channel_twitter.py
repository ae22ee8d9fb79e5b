"""The X (Twitter) channel: a leased poller of the account's mentions and DMs, and replies
as a reply tweet or a DM."""

from collections.abc import Mapping, Sequence

from config.registry import Shared
from config.settings import Settings
from connectors.settings import TwitterSettings
from connectors.twitter import TwitterConnector
from connectors.twitter.sender import TwitterSender
from ingest.errors import ConfigError
from ingest.protocols import Channel, CheckRow, HttpRoutes, Intake, Sender


class TwitterChannel:
    name = "twitter"

    def __init__(self, settings: TwitterSettings, shared: Shared) -> None:
        self._settings = settings
        self._shared = shared
        self._connector: TwitterConnector | None = None
        self._sender: TwitterSender | None = None

    def intake(self) -> Mapping[str, Intake]:
        shared = self._shared
        self._connector = TwitterConnector(
            self._settings,
            shared.sink,
            shared.cursors,
            shared.seen,
            shared.health,
            lease=shared.lease(),
            lease_retry=shared.lease_retry,
        )
        return {self.name: self._connector.run}

    def routes(self) -> Sequence[HttpRoutes]:
        return ()

    def senders(self) -> Sequence[Sender]:
        self._sender = TwitterSender(self._settings)
        return (self._sender,)

    async def check(self) -> list[CheckRow]:
        x = self._settings
        user_auth = all((x.consumer_key, x.consumer_secret, x.access_token, x.access_token_secret))
        return [
            (
                "twitter",
                True,
                "configured (credentials are verified by the first poll); "
                + ("OAuth 1.0a user context" if user_auth else "bearer token only"),
            )
        ]

    async def reload(self, settings: Settings) -> None:
        """Nothing live: ``[twitter]`` needs a restart (see the registry)."""

    async def close(self) -> None:
        try:
            if self._sender is not None:
                await self._sender.aclose()
        finally:
            if self._connector is not None:
                await self._connector.aclose()


def build(settings: Settings, shared: Shared) -> Channel[Settings]:
    """Called only when ``[twitter]`` is configured (the registry's ``enabled_by``)."""
    if settings.twitter is None:
        raise ConfigError("twitter: the channel needs a [twitter] section")
    return TwitterChannel(settings.twitter, shared)
