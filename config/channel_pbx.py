"""The PBX channel: the caller-ID route API (``/v1/route``) any telephone system can ask,
answered by the routing policy and recorded through the spool."""

from collections.abc import Mapping, Sequence

from config.registry import Shared
from config.settings import Settings
from connectors.pbx.routes import PbxRoutes
from ingest.protocols import Channel, CheckRow, HttpRoutes, Intake, Sender


class PbxChannel:
    name = "pbx"

    def __init__(self, settings: Settings, shared: Shared) -> None:
        self._settings = settings
        self._shared = shared

    def intake(self) -> Mapping[str, Intake]:
        return {}

    def routes(self) -> Sequence[HttpRoutes]:
        shared = self._shared
        pbx = PbxRoutes(
            settings=self._settings.api,
            decider=shared.decider,
            sink=shared.spool(),
            metrics=shared.metrics,
            region=self._settings.routing.default_region,
        )
        return (HttpRoutes(pbx.router, pbx.fast_path),)

    def senders(self) -> Sequence[Sender]:
        return ()

    async def check(self) -> list[CheckRow]:
        if self._settings.api.token is None:
            return [("api", True, "no api.token: /v1/route answers 401 to everyone")]
        return []

    async def reload(self, settings: Settings) -> None:
        """Nothing live: ``[api]`` and the default region need a restart (see the registry)."""

    async def close(self) -> None:
        """Nothing of its own: the spool is the process's."""


def build(settings: Settings, shared: Shared) -> Channel[Settings]:
    return PbxChannel(settings, shared)
