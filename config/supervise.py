"""Keeps one component running: restarts it with capped exponential backoff and jitter after
a failure, never lets its failure reach the daemon's TaskGroup, and stops it for good on an
error that retrying cannot fix (bad password, revoked token, bad configuration)."""

import asyncio
from collections.abc import Awaitable, Callable

import structlog

from ingest.backoff import Backoff, pause
from ingest.errors import AuthError, ConfigError
from ingest.health import Health

log = structlog.get_logger("omniroute.supervisor")


async def supervise(
    name: str,
    run: Callable[[asyncio.Event], Awaitable[None]],
    stop: asyncio.Event,
    health: Health,
    *,
    initial_delay: float = 1.0,
    max_delay: float = 60.0,
    running_is_up: bool = False,
) -> None:
    """``running_is_up``: the component says nothing itself (the pruner, the spool's drain,
    a mailbox group): it is "up" while its loop runs, "down" after a failure, "stopped" when
    it returned (issue 17: such a component showed "starting" for ever)."""
    backoff = Backoff(initial_delay, max_delay)
    failing = False
    while not stop.is_set():
        try:
            if running_is_up:
                health.set(name, "up")
            await run(stop)
            if running_is_up:
                health.set(name, "stopped")
            return
        except asyncio.CancelledError:
            raise
        except (AuthError, ConfigError) as exc:
            health.set(name, "down", str(exc))
            log.error("component.stopped", component=name, error=str(exc))
            return
        except Exception as exc:
            if not failing:
                log.exception("component.failed", component=name)
                failing = True
            health.set(name, "down", f"{type(exc).__name__}: {exc}")
        await pause(backoff.next(), stop)
    if failing:
        log.info("component.stopped_while_failing", component=name)
