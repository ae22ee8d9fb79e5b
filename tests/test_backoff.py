"""The one retry helper every connector and worker uses (issue 14)."""

import asyncio
import time

from ingest.backoff import Backoff, jittered, pause


def test_delays_double_up_to_the_cap_with_jitter_and_reset() -> None:
    """Jitter spreads instances that failed together; the cap bounds a long outage."""
    backoff = Backoff(1.0, 8.0)
    bases = [1, 2, 4, 8, 8, 8]
    for base in bases:
        delay = backoff.next()
        assert 0.5 * base <= delay < 1.5 * base
    backoff.reset()
    assert 0.5 <= backoff.next() < 1.5
    assert len({round(jittered(10.0), 6) for _ in range(50)}) > 1


async def test_pause_returns_early_when_stopped() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    started = time.monotonic()
    assert await pause(10.0, stop) is True
    assert time.monotonic() - started < 1.0
    assert await pause(0.01, asyncio.Event()) is False
    assert await pause(0.01) is False
