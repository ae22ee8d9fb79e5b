"""Capped exponential backoff with jitter, and the wait that a stop event cuts short.

Sole purpose (issue 14): one way to retry, instead of eight hand-written ones. Jitter
spreads the retries of many instances (or mailboxes) that failed together, so they do not
all come back at the same instant; the cap keeps a long outage from growing the wait
without bound.
"""

import asyncio
import contextlib
import random
from dataclasses import dataclass, field


def jittered(seconds: float) -> float:
    """``seconds`` times a factor drawn from [0.5, 1.5)."""
    return seconds * (0.5 + random.random())  # noqa: S311 (jitter, not crypto)


async def pause(seconds: float, stop: asyncio.Event | None = None) -> bool:
    """Wait ``seconds``, or less when ``stop`` is set; True when it was ``stop``."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
    return stop.is_set()


@dataclass
class Backoff:
    """Delays of ``initial`` doubling up to ``maximum``, each jittered; ``reset`` after a
    success starts again from ``initial``."""

    initial: float
    maximum: float
    _delay: float = field(init=False)

    def __post_init__(self) -> None:
        self._delay = self.initial

    def next(self) -> float:
        """The jittered delay to wait now; the one after it is twice as long (capped)."""
        delay = jittered(self._delay)
        self._delay = min(self._delay * 2, self.maximum)
        return delay

    def reset(self) -> None:
        self._delay = self.initial
