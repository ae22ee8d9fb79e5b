"""The parse pool's queue (issue 18): several small mails wait in one worker's pipe, each
answer reaches its own mail, and a worker that fails costs the mails behind it nothing.

A worker is frozen with SIGSTOP so that mails pile up in its pipe deterministically."""

import asyncio
import os
import signal

import pytest

from connectors.email.batch import pool_settings
from connectors.email.parse_pool import DEPTH, PIPE_CHUNK, ParseFailed, ParsePool
from connectors.settings import EmailSettings
from ingest.errors import TransientError
from tests.hostile_mail import good
from tests.support.waiting import until

KWARGS = {
    "mailbox": "support",
    "recipient": "support@omniroute.test",
    "inline_max": 64 * 1024,
    "locator": {"uid": 1},
}


async def _one_worker_frozen(pool: ParsePool) -> int:
    """Start the pool's only worker, freeze it, and return its pid."""
    assert (await pool.parse(good("warm"), **KWARGS)).subject == "warm"
    (worker,) = pool._all
    os.kill(worker.process.pid, signal.SIGSTOP)
    return worker.process.pid


async def _queued(pool: ParsePool, subjects: list[str]) -> list[asyncio.Task[object]]:
    """Parses of these subjects, all written to the frozen worker's pipe."""
    tasks = [asyncio.create_task(pool.parse(good(s), **KWARGS)) for s in subjects]
    await until(lambda: sum(len(w.queue) for w in pool._all) == len(subjects), 10, "queued")
    return tasks  # type: ignore[return-value]


async def test_every_answer_reaches_its_own_mail() -> None:
    """Two workers, many more mails than workers: each caller gets its own mail's message."""
    async with ParsePool(pool_settings(EmailSettings(parse_workers=2))) as pool:
        subjects = [f"mail {i}" for i in range(3 * DEPTH)]
        tasks = [asyncio.create_task(pool.parse(good(s), **KWARGS)) for s in subjects]
        deepest = 0
        while not all(t.done() for t in tasks):
            deepest = max([deepest, *(len(w.queue) for w in pool._all)])
            await asyncio.sleep(0)
        assert [t.result().subject for t in tasks] == subjects
        assert deepest > 1, "no worker ever held more than one mail"
        assert pool.replaced == 0


async def test_mails_behind_a_killed_worker_are_parsed_by_another() -> None:
    """The mail the worker was on is retried once (as before); those behind it were never
    begun and go to a fresh worker: none of them becomes a stand-in."""
    async with ParsePool(pool_settings(EmailSettings(parse_workers=1))) as pool:
        pid = await _one_worker_frozen(pool)
        subjects = [f"behind {i}" for i in range(5)]
        tasks = await _queued(pool, subjects)
        os.kill(pid, signal.SIGKILL)
        async with asyncio.timeout(20):
            results = await asyncio.gather(*tasks)
        assert [r.subject for r in results] == subjects  # type: ignore[attr-defined]
        assert pool.replaced == 1


async def test_a_frozen_worker_times_out_its_mail_and_hands_on_the_rest() -> None:
    """The deadline counts for the mail a worker is on: past it the worker is killed, that
    mail gets ``parse_timeout``, and the mails waiting behind it are parsed elsewhere."""
    settings = EmailSettings(parse_workers=1, parse_timeout=0.5)  # a 2 s wall deadline
    async with ParsePool(pool_settings(settings)) as pool:
        await _one_worker_frozen(pool)
        tasks = await _queued(pool, ["first", "second", "third"])
        async with asyncio.timeout(20):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        first, *rest = outcomes
        assert isinstance(first, ParseFailed), first
        assert first.reason == "parse_timeout"
        assert [r.subject for r in rest] == ["second", "third"]  # type: ignore[union-attr]
        assert pool.replaced == 1


async def test_a_cancelled_mail_waiting_in_the_pipe_costs_no_worker() -> None:
    """Only the caller of the mail a worker is on takes the worker with it when cancelled;
    a mail still waiting is parsed and its answer dropped, and the others are answered."""
    async with ParsePool(pool_settings(EmailSettings(parse_workers=1))) as pool:
        pid = await _one_worker_frozen(pool)
        first, second, third = await _queued(pool, ["first", "second", "third"])
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert pool.replaced == 0
        os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(20):
            assert (await first).subject == "first"  # type: ignore[attr-defined]
            assert (await third).subject == "third"  # type: ignore[attr-defined]
        assert pool.replaced == 0
        assert (await pool.parse(good("after"), **KWARGS)).subject == "after"


async def test_a_cancelled_mail_a_worker_is_on_ends_that_worker_only() -> None:
    async with ParsePool(pool_settings(EmailSettings(parse_workers=1))) as pool:
        await _one_worker_frozen(pool)
        first, second = await _queued(pool, ["first", "second"])
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert pool.replaced == 1
        async with asyncio.timeout(20):
            assert (await second).subject == "second"  # type: ignore[attr-defined]


async def test_workers_that_cannot_start_fail_every_waiting_mail_never_hang() -> None:
    """A worker that dies before it is ready (here: an address space limit past what
    setrlimit takes) is the machine's problem: every mail waiting for a worker hears it."""
    base = pool_settings(EmailSettings(parse_workers=2))
    starved = type(base)(workers=2, memory=10**30, timeout=5, limits=base.limits)
    async with ParsePool(starved) as pool:
        tasks = [asyncio.create_task(pool.parse(good(f"m{i}"), **KWARGS)) for i in range(10)]
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(o, TransientError) for o in outcomes), outcomes


async def test_a_large_mail_is_parsed_while_small_ones_keep_coming() -> None:
    """A mail over the pipe chunk needs an idle worker; small mails arriving all the time
    must not keep every worker's queue from ever emptying."""
    large = good("large").replace(b"Merhaba", b"Merhaba " * 12_000, 1)
    assert len(large) > PIPE_CHUNK
    async with ParsePool(pool_settings(EmailSettings(parse_workers=2))) as pool:
        stop = asyncio.Event()

        async def keep_parsing(n: int) -> None:
            while not stop.is_set():
                await pool.parse(good(f"small {n}"), **KWARGS)

        callers = [asyncio.create_task(keep_parsing(n)) for n in range(16)]
        try:
            await asyncio.sleep(0.5)  # every queue full
            async with asyncio.timeout(10):
                assert (await pool.parse(large, **KWARGS)).subject == "large"
        finally:
            stop.set()
            await asyncio.gather(*callers)
