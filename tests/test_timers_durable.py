"""Issue 16, durable timers: an offer's timer fires once however many instances run it, and
none is lost to a SIGKILL. The offers are written straight into the directory, already due;
the real timer worker (two of them on PostgreSQL, or the daemon as a process) fires them
onto the real broker, where every AMQP ``message_id`` ``<id>#2`` is counted."""

import asyncio
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import bindparam, select, update

from ingest.bus import Bus
from ingest.schema import utcnow
from ingest.topology import ROUTED_QUEUE
from routers.models import Assignment
from routers.offers import RETRY, OfferTimers
from routers.store.engine import create_engine
from routers.store.values import aware, utc
from tests.daemon_fixtures import DaemonProcess
from tests.seed import seeded
from tests.support.broker import filled, opened_bus, take, tally
from tests.support.timers import instance, write_due_offers
from tests.support.waiting import until

#: the daemon's address space bound, as for the other daemon-process tests
DAEMON_AS = 4 * 1024**3
#: ``OfferTimers``' batch: at most this many are taken and not yet closed at a kill
BATCH = 100
#: who was offered what: the sender, their customer and the agent the offer went to
OFFERED = [("ayse@acme.test", "acme", "ana"), ("it@globex.test", "globex", "bob")]
_assign = Assignment.__table__.c


async def due_offers(url: str, n: int) -> list[str]:
    """``n`` offers due a minute ago (``write_due_offers``); their ids."""
    return [m.id for m in await write_due_offers(url, n, OFFERED, "timers.test")]


@dataclass(frozen=True)
class Offers:
    """The assignments as the directory has them now."""

    #: not ended by the timer yet: a due time left, or no ``offer_timeout`` outcome
    open: set[str]
    #: taken by a worker and not closed: their due time was pushed ``RETRY`` ahead
    held: set[str]


async def offers_in(url: str) -> Offers:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    select(_assign.message_id, _assign.offer_due_at, _assign.outcome)
                )
            ).all()
    finally:
        await engine.dispose()
    now = utcnow()
    return Offers(
        open={r.message_id for r in rows if r.offer_due_at or r.outcome != "offer_timeout"},
        held={r.message_id for r in rows if r.offer_due_at and aware(r.offer_due_at) > now},
    )


async def as_if_down_for(url: str, ids: set[str], longer: timedelta) -> None:
    """As if the daemon had stayed down ``longer``: what it held is due that much sooner (the
    test's clock moved instead of waiting, as tests/test_offers.py moves the worker's).
    Computed here: SQLite has no datetime arithmetic in SQL."""
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            rows = await connection.execute(
                select(_assign.message_id, _assign.offer_due_at).where(
                    _assign.message_id.in_(sorted(ids))
                )
            )
            moved = [{"id": r.message_id, "due": utc(aware(r.offer_due_at) - longer)} for r in rows]
            if moved:
                await connection.execute(
                    update(Assignment)
                    .where(_assign.message_id == bindparam("id"))
                    .values(offer_due_at=bindparam("due")),
                    moved,
                )
    finally:
        await engine.dispose()


async def count_the_rest(reader: Bus, counts: dict[str, int]) -> dict[str, int]:
    """Add to ``counts`` every copy still in omniroute.routed (a second copy comes after the
    first: ``tally`` stops at the first of each)."""
    for got in await take(reader, ROUTED_QUEUE, quiet=0):
        name = got.message_id or ""
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.mark.slow
async def test_two_instances_on_postgresql_fire_each_offer_once(pg_url: str, amqp_url: str) -> None:
    """Every instance may run the timer worker (issue 16): FOR UPDATE SKIP LOCKED gives each
    due offer to one of them, so the ticket system sees one ``<id>#2``, not two."""
    await seeded(pg_url)
    ids = await due_offers(pg_url, 2000)
    async with (
        instance(OfferTimers, pg_url, amqp_url, "a") as a,
        instance(OfferTimers, pg_url, amqp_url, "b") as b,
    ):
        started = time.monotonic()
        taken = await asyncio.gather(a.drain(), b.drain())
        drained = time.monotonic() - started
        fired = (a.fired, b.fired)
        async with opened_bus(amqp_url, name="reader") as reader:
            counts = await tally(reader, ROUTED_QUEUE, {f"{i}#2" for i in ids}, timeout=30)
            await count_the_rest(reader, counts)  # drain() returned: all are confirmed
    print(
        f"offers=2000 taken={taken} fired={fired} published={sum(counts.values())} "
        f"drained_in={drained:.1f}s"
    )
    assert all(fired), f"both instances must have fired some for this to mean anything: {fired}"
    assert sum(taken) == sum(fired) == 2000, "each offer taken by one instance, once"
    assert counts == {f"{i}#2": 1 for i in ids}
    assert not (await offers_in(pg_url)).open


@pytest.mark.slow
async def test_sigkill_with_10000_due_offers_loses_none(
    daemon: DaemonProcess, amqp_url: str, sqlite_url: str, tmp_path: Path
) -> None:
    """``run --component timers`` killed mid-way and started again: every offer fires, the
    ones it had taken (one batch at most) again after ``RETRY``, with the same ids."""
    await seeded(sqlite_url)
    ids = await due_offers(sqlite_url, 10_000)
    want = {f"{i}#2" for i in ids}
    log = tmp_path / "daemon.log"
    async with opened_bus(amqp_url, name="reader") as reader:
        proc = daemon.start("timers", log=log, address_space=DAEMON_AS)
        await filled(reader, ROUTED_QUEUE, 1000, meanwhile=_running(proc, log))
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        killed = await offers_in(sqlite_url)
        assert killed.open, "the kill must land mid-way for this test to mean anything"
        assert len(killed.held) <= BATCH, "one batch in flight at a time"
        # down long enough for what it held to be due again, as after a real RETRY
        await as_if_down_for(sqlite_url, killed.held, RETRY)

        started = time.monotonic()
        again = daemon.start("timers", log=log, address_space=DAEMON_AS)
        counts = await tally(reader, ROUTED_QUEUE, want, timeout=60)
        await until(_closed(sqlite_url), 15, "every offer closed")  # so all are confirmed
        restarted = time.monotonic() - started
        await count_the_rest(reader, counts)
        again.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(again.wait, 25) == 0
    lost = want - counts.keys()
    twice = {name.removesuffix("#2") for name, n in counts.items() if n > 1}
    print(
        f"offers=10000 open_at_kill={len(killed.open)} held_at_kill={len(killed.held)} "
        f"published={sum(counts.values())} lost={len(lost)} duplicated={len(twice)} "
        f"restart_to_all_closed={restarted:.1f}s"
    )
    assert not lost
    assert counts.keys() == want, "nothing else was published"
    assert max(counts.values()) <= 2
    assert twice <= killed.held, "only what was in flight at the kill fires twice"
    assert "Traceback" not in log.read_text()


def _running(proc: subprocess.Popen[bytes], log: Path) -> Callable[[], None]:
    def check() -> None:
        assert proc.poll() is None, log.read_text()[-3000:]

    return check


def _closed(url: str) -> Callable[[], object]:
    async def check() -> bool:
        return not (await offers_in(url)).open

    return check


async def test_two_timer_workers_on_one_sqlite_file_fire_each_offer_once(
    amqp_url: str, sqlite_url: str
) -> None:
    """Two processes on one host's SQLite file (``omniroute run`` and ``run --component
    timers``): pysqlite reads outside a transaction until its first write, so a take that
    read the due rows before writing would read the same rows as the other worker while a
    third writer holds the lock, and both would publish them (6aa8aa8 did: taken [100, 100]).
    The take must write first, so that it reads under the database's write lock."""
    await seeded(sqlite_url)
    blocker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        async with (
            instance(OfferTimers, sqlite_url, amqp_url, "a") as a,
            instance(OfferTimers, sqlite_url, amqp_url, "b") as b,
        ):
            assert not any(await asyncio.gather(a.drain(), b.drain()))  # connections open
            ids = await due_offers(sqlite_url, BATCH)
            blocker.execute("BEGIN IMMEDIATE")  # a router's claim, say, holds the lock
            drains = asyncio.gather(a.drain(), b.drain())
            await asyncio.sleep(1)  # both have read the due rows and wait to write
            blocker.execute("COMMIT")
            taken = await drains
            async with opened_bus(amqp_url, name="reader") as reader:
                counts = await tally(reader, ROUTED_QUEUE, {f"{i}#2" for i in ids}, timeout=30)
                await count_the_rest(reader, counts)
    finally:
        blocker.close()
    print(f"offers={BATCH} taken={taken} published={sum(counts.values())}")
    assert counts == {f"{i}#2": 1 for i in ids}


async def test_a_stop_during_a_backlog_returns_after_the_batch_in_hand(
    amqp_url: str, sqlite_url: str
) -> None:
    """SIGTERM drains (DESIGN.md): with thousands of timers due, a stopped worker finishes the
    batch it took and returns, instead of firing the whole backlog first (the daemon would
    cancel it at shutdown_timeout, mid-batch). What it left fires at the next start."""
    await seeded(sqlite_url)
    ids = await due_offers(sqlite_url, 3000)
    async with instance(OfferTimers, sqlite_url, amqp_url, "a") as worker:
        stop = asyncio.Event()
        running = asyncio.create_task(worker.run(stop))
        await until(lambda: worker.fired >= BATCH, 30, "the first batch fired")
        stop.set()
        started = time.monotonic()
        async with asyncio.timeout(30):
            await running
        stopped_in = time.monotonic() - started
    left = (await offers_in(sqlite_url)).open
    print(f"offers=3000 fired={worker.fired} left={len(left)} stopped_in={stopped_in:.2f}s")
    assert left, "stopped: the rest of the backlog is the next start's"
    assert worker.fired <= len(ids) - len(left) <= worker.fired + BATCH
    assert stopped_in < 2.0
