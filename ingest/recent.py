"""What this process routed lately, in memory, for the status page (issue 17).

Sole purpose: the router appends each confirmed decision; the status page reads the last
few decisions and the decisions per minute by channel and reason. Both are bounded: a ring
of ``size`` decisions and ``minutes`` one-minute tallies, each keyed by (channel, reason),
which are closed sets (``ingest.schema``). Nothing here survives a restart, and nothing is
shared between processes: a status page shows what its own process routed.

The sender is kept as it came (the page redacts it unless ``log.redact = false``); it is
held no longer than the ring holds the decision.
"""

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from ingest.schema import RoutedMessage

#: decisions kept for the page's "last decisions"
SIZE = 50
#: one-minute tallies kept, the current (partial) minute included
MINUTES = 5


@dataclass(frozen=True, slots=True)
class Decision:
    at: float  # seconds since the epoch
    channel: str
    sender: str
    routing_key: str
    reason: str
    attempt: int


@dataclass(frozen=True, slots=True)
class Minute:
    start: float  # seconds since the epoch, a whole minute
    counts: Counter[tuple[str, str]]  # (channel, reason) -> decisions


class RecentDecisions:
    """A bounded record of decisions; ``add`` is O(1) and never raises on the hot path."""

    def __init__(
        self, *, size: int = SIZE, minutes: int = MINUTES, clock: Callable[[], float] = time.time
    ) -> None:
        self.minutes = minutes
        self._clock = clock
        self._last: deque[Decision] = deque(maxlen=size)
        self._tallies: deque[tuple[int, Counter[tuple[str, str]]]] = deque(maxlen=minutes)

    def add(self, routed: RoutedMessage) -> None:
        """Record one decision whose routed publish was confirmed."""
        now = self._clock()
        route, message = routed.route, routed.message
        self._last.append(
            Decision(
                now,
                message.channel,
                message.sender.address,
                route.routing_key,
                route.reason,
                route.attempt,
            )
        )
        minute = int(now // 60)
        if not self._tallies or self._tallies[-1][0] != minute:
            self._tallies.append((minute, Counter()))
        self._tallies[-1][1][(message.channel, route.reason)] += 1

    def last(self) -> list[Decision]:
        """The decisions kept, newest first."""
        return list(reversed(self._last))

    def per_minute(self) -> list[Minute]:
        """The last ``minutes`` minutes, oldest first, the current one last; a minute
        without decisions has an empty tally."""
        now = int(self._clock() // 60)
        kept = dict(self._tallies)
        return [
            Minute(float(minute * 60), Counter(kept.get(minute, {})))
            for minute in range(now - self.minutes + 1, now + 1)
        ]
