"""Ending the tasks of a mailbox pass (``connectors.email.batch``) without losing a
cancellation, and without leaving a task behind.

Sole purpose: a pass has a task fetching ahead, parses started, and batches settling;
when it ends early (a failed batch, an IMAP error, the daemon stopping) each of them is
ended and awaited, and a cancellation that arrives meanwhile is raised once all ended.
"""

import asyncio
import contextlib
from collections import deque
from typing import Any


def cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def abandon(task: "asyncio.Task[Any]") -> bool:
    """Cancel a batch's parse and wait for it: what it recorded makes the next pass
    publish it (its slots were never confirmed). True if the caller was cancelled."""
    task.cancel()
    return await settled(task)


async def settled(task: "asyncio.Task[Any]") -> bool:
    """Wait for a task whatever it ends with (its error is already the caller's, or is
    met again by the next pass); True if the caller was cancelled meanwhile, once the
    task ended too (a task ending cancelled is not that)."""
    me = asyncio.current_task()
    before = me.cancelling() if me is not None else 0
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if me is None or me.cancelling() <= before:
            return False
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return True
    except Exception:  # noqa: S110 (see the docstring)
        pass
    return False


async def wind_down(
    fetching: "asyncio.Task[None]",
    ready: "asyncio.Queue[Any]",
    settling: "deque[asyncio.Task[int]]",
    *,
    stop: bool,
) -> None:
    """End a mailbox pass: the fetching task and the batches it parsed ahead, then the
    batches settling (cancelled too when ``stop``, or when the pass is or gets
    cancelled: that cancellation is raised once all of them ended)."""
    fetching.cancel()
    cancelled = await settled(fetching)
    while not ready.empty():
        left = ready.get_nowait()
        if isinstance(left, tuple):
            cancelled |= await abandon(left[1])
    for task in settling:
        if stop or cancelled or cancelling():
            task.cancel()
        cancelled |= await settled(task)
    if cancelled:
        raise asyncio.CancelledError
