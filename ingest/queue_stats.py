"""Queue depths and consumer counts of every omniroute queue, asked of the broker when
``GET /metrics`` is scraped (issue 17).

Sole purpose: the numbers a "routed queue not consumed" alert needs, without a scrape storm
hammering the broker: the broker is asked at most once per ``metrics.queue_cache_for`` (a
failure is remembered as long), scrapes that arrive meanwhile share one question in flight,
and the whole question is bounded by ``metrics.queue_timeout``. Passive declares go on a
channel of their own, opened for the question and closed after it: a queue that is missing
makes the broker close the channel it was asked on (404), which must never be the
publishers' channel.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable

import aiormq
import structlog
from aio_pika.abc import AbstractChannel

from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.metrics import Metrics
from ingest.topology import QUEUES

log = structlog.get_logger("omniroute.metrics")


class QueueStats:
    """``refresh`` is a ``Metrics.watch`` hook: it sets ``omniroute_queue_messages``,
    ``omniroute_queue_consumers`` and ``omniroute_queue_stats_up``."""

    def __init__(
        self,
        bus: Bus,
        metrics: Metrics,
        *,
        queues: tuple[str, ...] = tuple(QUEUES),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bus = bus
        self._metrics = metrics
        self._queues = queues
        self._clock = clock
        self._asked_at: float | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        #: questions actually put to the broker (tests count them)
        self.asked = 0

    def _fresh(self) -> bool:
        cache_for = self._metrics.settings.queue_cache_for
        return self._asked_at is not None and self._clock() - self._asked_at < cache_for

    async def refresh(self) -> None:
        if self._fresh():
            return
        async with self._lock:  # one question in flight; the others wait for its answer
            if self._fresh():
                return
            try:
                async with asyncio.timeout(self._metrics.settings.queue_timeout):
                    counts = await self._ask()
            except (TimeoutError, TransientError, aiormq.exceptions.AMQPError, OSError) as exc:
                self._failed(exc)
            else:
                self._set(counts)
            finally:
                self._asked_at = self._clock()

    async def _ask(self) -> dict[str, tuple[int, int]]:
        """``queue -> (ready, consumers)``; a queue the broker does not have is left out."""
        self.asked += 1
        counts: dict[str, tuple[int, int]] = {}
        channel: AbstractChannel | None = None
        try:
            for queue in self._queues:
                if channel is None or channel.is_closed:
                    channel = await self._bus.connection.channel(publisher_confirms=False)
                underlay = await channel.get_underlay_channel()
                try:
                    ok = await underlay.queue_declare(queue, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    await _close(channel)  # closed by the broker already
                    channel = None
                    continue
                counts[queue] = (ok.message_count or 0, ok.consumer_count or 0)
        finally:
            if channel is not None:
                await _close(channel)
        return counts

    def _set(self, counts: dict[str, tuple[int, int]]) -> None:
        metrics = self._metrics
        metrics.queue_messages.clear()
        metrics.queue_consumers.clear()
        for queue, (ready, consumers) in counts.items():
            metrics.queue_messages.labels(queue).set(ready)
            metrics.queue_consumers.labels(queue).set(consumers)
        metrics.queue_stats_up.set(1)
        if self._failing:
            self._failing = False
            log.info("metrics.queue_stats_recovered")

    def _failed(self, exc: BaseException) -> None:
        """Stale numbers would look like a healthy queue: leave the series out instead."""
        metrics = self._metrics
        metrics.queue_messages.clear()
        metrics.queue_consumers.clear()
        metrics.queue_stats_up.set(0)
        if not self._failing:
            self._failing = True
            log.warning("metrics.queue_stats_failed", error=f"{type(exc).__name__}: {exc}"[:300])


async def _close(channel: AbstractChannel) -> None:
    with contextlib.suppress(Exception):  # a channel the broker closed may refuse a close
        await channel.close()
