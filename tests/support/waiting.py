"""Waiting for a condition (issue 14: one poller, not one per test module), for the places
where there is nothing to ask "done?" (``QueueWorker.idle()``, ``drain()``, ``take``) and no
event to await: a log line, a health state, a flag on a mailbox, a row in the directory."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable

#: how long ``until`` sleeps between two looks at a condition still false
POLL = 0.02


async def until(
    condition: Callable[[], object | Awaitable[object]],
    timeout: float = 15.0,
    what: str = "",
) -> None:
    """Return once ``condition()`` is true; it is asked every ``POLL`` seconds, and may be a
    plain function or a coroutine function (awaited each time). An exception out of it
    (an ``assert`` that a process still runs, say) ends the wait with that exception. After
    ``timeout`` seconds ``TimeoutError``, saying ``what`` was waited for."""
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            while True:
                answer = condition()
                if inspect.isawaitable(answer):
                    answer = await answer
                if answer:
                    return
                await asyncio.sleep(POLL)
    except TimeoutError as late:
        if not deadline.expired():
            raise  # the condition's own
        raise TimeoutError(f"not within {timeout} s: {what or condition}") from late
