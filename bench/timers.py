#!/usr/bin/env python3
"""Offer timers (issue 16): N offers due within one minute, fired by the daemon while its
router routes a steady stream; lateness of the timers, the router's rate meanwhile.

In one run, on a fresh vhost and a fresh copy of the cached directory (``benchlib``):

1. the bare forwarder (``bench/forwarder.py``) is timed with the router's own message size;
2. ``--backlog`` inbound emails (``throughput.make_body``: 70 % known senders) are preloaded
   into ``omniroute.router``, so the router is never short of work (the steady stream);
3. N offers are written straight into the directory (a routed record and the agent's
   assignment each, as ``claim_routed_many`` writes them, from known customers), due at
   ``T0 + i * spread / N``: evenly over ``--spread`` seconds, ``T0`` ``--lead`` seconds on;
4. the daemon starts (``omniroute run --component timers --component router``, default
   settings, JSON logs to a file): the router drains the backlog at once, the timer
   worker sleeps until ``T0`` and fires; the run ends when every offer is closed;
5. the forwarder is timed again; the router's rates are divided by the mean of the two.

Afterwards every message in ``omniroute.routed`` is read. A re-routed offer (``route.
attempt`` 2, AMQP message id ``<id>#2``) fired at its ``route.decided_at``: lateness is that
minus its due time (recomputed from the order the offers were written in). The router's
rate is counted from the first decisions' (``attempt`` 1) ``decided_at``: alone (the
``--alone`` seconds before ``T0``, the timer asleep) and meanwhile (from ``T0`` to the last
fire, or to the end of the backlog if it ran out first, which the output says).

Usage: timers.py [--customers 100000] [--offers 100000] [--spread 60] [--lead 30]
       [--alone 10] [--backlog 150000] [-n 20000 (forwarder)]
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import benchlib
from forwarder import forward, limit_sample
from gen_directory import AGENTS_PER_TEAM, TEAMS
from throughput import make_body, preload

ROOT = Path(__file__).resolve().parent.parent
AGENTS = TEAMS * AGENTS_PER_TEAM


def offer_rows(
    n: int, customers: int, run: str, first_due: datetime, spread: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, datetime]]:
    """N offers to known customers (routed records, assignments) and each one's due time."""
    from ingest.schema import Identity, InboundMessage, Thread

    offered_at = datetime.now(UTC) - timedelta(minutes=5)
    records, assignments, due = [], [], {}
    for i in range(n):
        customer = i * 104729 % customers
        external = f"<offer-{run}-{i}@mail.example>"
        message = InboundMessage(
            channel="email",
            external_id=external,
            sender=Identity(kind="email", address=benchlib.known_email(customer)),
            recipient=Identity(kind="email", address="support@example.com"),
            subject="Modemim calismiyor",
            text="x" * 600,
            thread=Thread(message_id=external),
        )
        agent = f"agent-{i % AGENTS:04d}"
        due[message.id] = first_due + timedelta(seconds=spread * i / n)
        records.append(
            {
                "id": message.id,
                "channel": "email",
                "external_id": external,
                "thread_message_id": external.strip("<>"),
                "customer_id": f"c{customer:08d}",
                "route_kind": "agent",
                "route_target": agent,
                "reason": "last_agent",
                "routed_at": offered_at,
                "message": message.model_dump_json(),
            }
        )
        assignments.append(
            {
                "message_id": message.id,
                "agent_id": agent,
                "customer_id": f"c{customer:08d}",
                "channel": "email",
                "assigned_at": offered_at,
                "closed_at": None,
                "offer_due_at": due[message.id],
                "accepted_at": None,
                "outcome": None,
                "attempt": 1,
                "message": message.model_dump_json(),
            }
        )
    return records, assignments, due


def write_offers(
    db_url: str, records: list[dict[str, Any]], assignments: list[dict[str, Any]]
) -> float:
    """Insert the offers with executemany (a synchronous engine: no loop to share); seconds."""
    from sqlalchemy import create_engine, insert

    from routers.models import Assignment, RoutedRecord

    t0 = time.perf_counter()
    engine = create_engine(db_url.replace("sqlite:", "sqlite+pysqlite:", 1))
    try:
        with engine.begin() as connection:
            connection.execute(insert(RoutedRecord), records)
            connection.execute(insert(Assignment), assignments)
    finally:
        engine.dispose()
    return time.perf_counter() - t0


def open_offers(db_url: str) -> int:
    from sqlalchemy import create_engine, func, select

    from routers.models import Assignment

    engine = create_engine(db_url.replace("sqlite:", "sqlite+pysqlite:", 1))
    try:
        with engine.connect() as connection:
            found = connection.scalar(
                select(func.count()).where(Assignment.offer_due_at.is_not(None))
            )
    finally:
        engine.dispose()
    return int(found or 0)


def write_config(folder: Path, url: str, db_url: str) -> Path:
    path = folder / "omniroute.toml"
    path.write_text(
        "\n".join(
            [
                f'amqp_url = "{url}"',
                f'database_url = "{db_url}"',
                f'state_dir = "{folder / "state"}"',
                "[routing]",
                f'default_region = "{benchlib.REGION}"',
                "[http]",
                'host = "127.0.0.1"',
                "port = 0",
                "[log]",
                'format = "json"',
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def start_daemon(config: Path, log: Path) -> "subprocess.Popen[bytes]":
    """``omniroute run --component timers --component router``, as an operator starts it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    env["PYTHONPATH"] = str(ROOT)
    with log.open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "config.cli",
                "--config",
                str(config),
                "run",
                "--component",
                "timers",
                "--component",
                "router",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Routed:
    """What was read back from omniroute.routed: fire times by message id, the router's
    decision times, and how many of each id came."""

    fired: dict[str, datetime]
    decided: list[datetime]
    copies: dict[str, int]


async def read_routed(url: str, expected: int) -> Routed:
    """Consume every message of omniroute.routed (no ack, a wide window)."""
    import aio_pika

    out = Routed({}, [], {})
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=2000)
        queue = await channel.declare_queue("omniroute.routed", passive=True)
        taken = 0
        async with asyncio.timeout(600), queue.iterator(no_ack=True) as messages:
            async for message in messages:
                route = json.loads(message.body)["route"]
                at = datetime.fromisoformat(route["decided_at"])
                name = message.message_id or ""
                out.copies[name] = out.copies.get(name, 0) + 1
                if route.get("attempt", 1) > 1:
                    out.fired[name.split("#", 1)[0]] = at
                else:
                    out.decided.append(at)
                taken += 1
                if taken >= expected:
                    break
    finally:
        await conn.close()
    return out


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p * len(s)))]


def rate_in(times: list[datetime], start: datetime, end: datetime) -> float:
    seconds = (end - start).total_seconds()
    return sum(1 for t in times if start <= t < end) / seconds if seconds > 0 else 0.0


async def main(a: argparse.Namespace) -> None:
    from routers.store.engine import migrate

    print(benchlib.machine())
    template = benchlib.directory_db(a.customers)
    run = uuid.uuid4().hex[:6]
    work = benchlib.CACHE / f"timers-{run}"
    work.mkdir(parents=True)
    copy = work / "directory.sqlite"
    shutil.copyfile(template, copy)
    db_url = f"sqlite:///{copy}"
    await migrate(db_url)  # the cached directory may predate the offers' columns
    size = len(limit_sample(0))
    bodies = [make_body(i, 0.7, a.customers, run, size) for i in range(a.n)]
    print(
        f"offers: {a.offers} due evenly over {a.spread:.0f} s ({a.offers / a.spread:.0f}/s); "
        f"backlog {a.backlog} inbound emails of {size} bytes, 70 % known senders; "
        f"customers {a.customers}; daemon: run --component timers --component router"
    )
    forwarder: list[float] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        with benchlib.fresh_vhost() as url:
            forwarder.append(await forward(url, a.n, 256, lambda i: bodies[i], quiet=True))
            print(f"forwarder before: {forwarder[-1]:.0f} msg/s", flush=True)
            t = time.perf_counter()
            await preload(
                url, [make_body(i, 0.7, a.customers, f"{run}b", size) for i in range(a.backlog)]
            )
            print(f"backlog preloaded in {time.perf_counter() - t:.0f} s", flush=True)

            first_due = datetime.now(UTC) + timedelta(seconds=a.lead)
            records, assignments, due = offer_rows(a.offers, a.customers, run, first_due, a.spread)
            wrote = write_offers(db_url, records, assignments)
            del records, assignments
            print(f"offers written in {wrote:.1f} s; first due {first_due:%H:%M:%S.%f}", flush=True)
            proc = start_daemon(write_config(work, url, db_url), work / "daemon.log")
            started = time.perf_counter()
            while (left := await asyncio.to_thread(open_offers, db_url)) > 0:
                if proc.poll() is not None:
                    raise SystemExit(f"the daemon exited ({proc.returncode}); see {work}")
                if time.perf_counter() - started > a.timeout:
                    raise SystemExit(f"{left} offers still open after {a.timeout} s")
                await asyncio.sleep(1)
            cpu = cpu_seconds(proc.pid)
            proc.terminate()
            await asyncio.to_thread(proc.wait, 60)
            print(
                f"all offers fired; daemon CPU {cpu:.0f} s over "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
            depth_router = await depth(url, "omniroute.router")
            depth_routed = await depth(url, "omniroute.routed")
            routed = await read_routed(url, depth_routed)
            forwarder.append(await forward(url, a.n, 256, lambda i: bodies[i], quiet=True))
            print(f"forwarder after: {forwarder[-1]:.0f} msg/s", flush=True)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
    report(a, due, routed, forwarder, depth_router, cpu)
    shutil.rmtree(work, ignore_errors=True)


async def depth(url: str, queue: str) -> int:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0
    finally:
        await conn.close()


def report(
    a: argparse.Namespace,
    due: dict[str, datetime],
    routed: Routed,
    forwarder: list[float],
    backlog_left: int,
    cpu: float,
) -> None:
    missing = [i for i in due if i not in routed.fired]
    twice = sum(1 for name, n in routed.copies.items() if "#" in name and n > 1)
    late = [(routed.fired[i] - due[i]).total_seconds() for i in due if i in routed.fired]
    first_due = min(due.values())
    fired = sorted(routed.fired.values())
    last_fire = fired[-1]
    span = (last_fire - fired[0]).total_seconds()
    fwd = sum(forwarder) / len(forwarder)
    print(f"fired {len(fired)} of {len(due)}, missing {len(missing)}, published twice {twice}")
    print(
        f"lateness (route.decided_at - due): p50 {percentile(late, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(late, 0.99) * 1000:.0f} ms, max {max(late) * 1000:.0f} ms"
    )
    print(
        f"firing: {len(fired)} in {span:.1f} s = {len(fired) / span:.0f}/s "
        f"(due at {len(due) / a.spread:.0f}/s); last fire "
        f"{(last_fire - first_due).total_seconds():.1f} s after the first due time"
    )
    alone = meanwhile = 0.0
    decided = sorted(routed.decided)
    if decided:
        router_end = decided[-1]
        window_end = min(last_fire, router_end)
        alone = rate_in(decided, first_due - timedelta(seconds=a.alone), first_due)
        meanwhile = rate_in(decided, first_due, window_end)
        print(
            f"router: {len(decided)} routed; alone (the {a.alone:.0f} s before the first due "
            f"time) {alone:.0f} msg/s = {alone / fwd:.2f} of the forwarder; while the timers "
            f"fired ({(window_end - first_due).total_seconds():.1f} s) {meanwhile:.0f} msg/s "
            f"= {meanwhile / fwd:.2f} of the forwarder"
        )
        if router_end <= first_due:
            print(
                "  the backlog ran out before the first due time: no rate meanwhile "
                "(raise --backlog)"
            )
        elif router_end < last_fire:
            print(
                f"  the backlog ran out {(last_fire - router_end).total_seconds():.1f} s "
                "before the last fire: the rate meanwhile is over the overlap only"
            )
        elif backlog_left:
            print(f"  ({backlog_left} of the backlog still queued when the daemon stopped)")
    print(f"forwarder: {forwarder[0]:.0f} msg/s before, {forwarder[1]:.0f} after, mean {fwd:.0f}")
    print(f"daemon CPU: {cpu:.0f} s in all")
    print(
        json.dumps(
            {
                "offers": len(due),
                "fired": len(fired),
                "missing": len(missing),
                "twice": twice,
                "late_p50": percentile(late, 0.5),
                "late_p99": percentile(late, 0.99),
                "late_max": max(late),
                "fire_rate": len(fired) / span,
                "router_alone": alone,
                "router_meanwhile": meanwhile,
                "forwarder": forwarder,
            }
        )
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--offers", type=int, default=100_000)
    p.add_argument("--spread", type=float, default=60.0, help="seconds the due times span")
    p.add_argument(
        "--lead",
        type=float,
        default=30.0,
        help="seconds from writing the offers to the first due time",
    )
    p.add_argument(
        "--alone",
        type=float,
        default=10.0,
        help="seconds before the first due time the router's rate alone is taken",
    )
    p.add_argument("--backlog", type=int, default=150_000)
    p.add_argument("-n", type=int, default=20_000, help="messages per forwarder run")
    p.add_argument("--timeout", type=float, default=900.0)
    asyncio.run(main(p.parse_args()))
