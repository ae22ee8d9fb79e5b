"""Taking a webhook's message in once: the dedup mark, the sink, the mark undone on failure."""

import structlog

from ingest.errors import TransientError
from ingest.metrics import Metrics
from ingest.protocols import InboundSink, SeenStore
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.twilio")


class WebhookIntake:
    """Sole purpose: a message Twilio sends again (same MessageSid or CallSid) is published
    once, and one that could not be made safe is not remembered as seen."""

    def __init__(self, sink: InboundSink, seen: SeenStore, metrics: Metrics) -> None:
        self._sink = sink
        self.seen = seen
        self._metrics = metrics

    async def first_time(self, channel: str, external_id: str) -> bool:
        """A broken dedup store must not lose input: publish, the router deduplicates too."""
        try:
            return await self.seen.first_time(channel, external_id)
        except TransientError as exc:
            log.warning("twilio.seen_store_unavailable", error=str(exc)[:300])
            return True

    async def submit(self, message: InboundMessage) -> None:
        """Make the message safe or raise ``TransientError``; undo the dedup mark then."""
        try:
            await self._sink.submit(message)
        except BaseException:
            try:
                await self.seen.forget(message.channel, message.external_id)
            except TransientError as exc:
                log.warning("twilio.forget_failed", error=str(exc)[:300])
            raise
        self._metrics.messages_in.labels(message.channel).inc()
