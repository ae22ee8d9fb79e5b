"""Taking a channel's message in once: the dedup mark, the sink, the mark undone on failure.

Sole purpose (issue 14: written once, not per connector): a message its channel sends
again (the same MessageSid, CallSid, tweet or DM id) is published once, and one that could
not be made safe is not remembered as seen, so the channel's retry is taken.
"""

import structlog

from ingest.errors import TransientError
from ingest.metrics import Metrics
from ingest.protocols import InboundSink, SeenStore
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.dedup")


class OnceSink:
    """``first_time`` then ``submit``; ``open_on_outage`` says what a broken seen store
    means: True publishes anyway (a webhook must not lose input; the router deduplicates
    too), False raises ``TransientError`` (a poller simply tries the pass again)."""

    def __init__(
        self,
        sink: InboundSink,
        seen: SeenStore,
        *,
        name: str,
        open_on_outage: bool,
        metrics: Metrics | None = None,
    ) -> None:
        self._sink = sink
        self.seen = seen
        self._open = open_on_outage
        self._metrics = metrics
        # the connector's own event names (docs/OPERATIONS.md lists them), not new ones
        self._unavailable = name + ".seen_store_unavailable"
        self._forget_failed = name + ".forget_failed"

    async def first_time(self, channel: str, external_id: str) -> bool:
        try:
            return await self.seen.first_time(channel, external_id)
        except TransientError as exc:
            if not self._open:
                raise
            log.warning(self._unavailable, channel=channel, error=str(exc)[:300])
            return True

    async def submit(self, message: InboundMessage, *, channel: str | None = None) -> None:
        """Make the message safe or raise; the dedup mark (under ``channel``, default the
        message's own) is undone then, so the channel's retry is taken."""
        try:
            await self._sink.submit(message)
        except BaseException:
            try:
                await self.seen.forget(channel or message.channel, message.external_id)
            except TransientError as exc:
                log.warning(self._forget_failed, error=str(exc)[:300])
            raise
        if self._metrics is not None:
            self._metrics.messages_in.labels(message.channel).inc()
