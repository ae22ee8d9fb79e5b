#!/usr/bin/env python3
"""Instructions per message of the router and of the bare forwarder, counted by callgrind.

Wall-clock rates on a shared 2-vCPU machine move by 10-20 % from run to run, more than
most single changes to the router gain. valgrind's callgrind counts the instructions a
process executes, which repeat to within a fraction of a percent, so this is the measure to
decide a change by; ``bench/throughput.py`` remains the figure of merit.

Each side runs in a child under ``valgrind --tool=callgrind``, waits at a barrier, has its
counters zeroed (``callgrind_control -z``), consumes N preloaded messages, and has them
dumped once the N-th message is confirmed downstream. Under valgrind a process is about 50
times slower than the broker, so the router always sees full batches (half the prefetch):
``--prefetch`` smaller than the default shows the fixed cost per batch. Counts include every
thread of the process (aiosqlite's) but not the kernel.

Needs valgrind (``apt-get install valgrind``). Usage:
    instructions.py [-n 2000] [--customers 100000] [--prefetch 256] [--skip-forwarder]
                    [--database-url postgresql://...]

With ``--database-url`` the router reads an imported directory (as ``throughput.py``'s);
the database server's instructions are not counted, only the router process's.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import benchlib
from forwarder import limit_sample
from throughput import depth, fresh_db, make_body, preload

HERE = Path(__file__).resolve().parent


async def forwarder_child(url: str, prefetch: int) -> None:
    """limit_forwarder's loop on queue ``fwd.in.q``, started by "go", ended by "stop"."""
    import aio_pika

    conn = await aio_pika.connect_robust(url)
    channel = await conn.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=prefetch)
    out = await channel.get_exchange("fwd.out")
    queue = await channel.get_queue("fwd.in.q")

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        decoded = json.loads(message.body)
        body = json.dumps(decoded).encode()
        await out.publish(aio_pika.Message(body, delivery_mode=2), routing_key="team.x")
        await message.ack()

    loop = asyncio.get_running_loop()
    sys.stderr.write("ready\n")
    sys.stderr.flush()
    await loop.run_in_executor(None, sys.stdin.readline)
    tag = await queue.consume(handle)
    await loop.run_in_executor(None, sys.stdin.readline)
    await queue.cancel(tag)
    await conn.close()


async def count(cmd: list[str], url: str, queue: str, n: int, tag: str) -> int:
    """Instructions the child ``cmd`` executes from "go" until ``queue`` holds ``n``."""
    out = benchlib.CACHE / f"callgrind.{tag}"
    proc = subprocess.Popen(  # noqa: ASYNC220 (not timed: the counter is zeroed below)
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
        stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    assert proc.stdin is not None
    assert proc.stderr is not None
    try:
        while (line := await asyncio.to_thread(proc.stderr.readline)).strip() != b"ready":
            if not line:
                raise SystemExit(f"child failed: {' '.join(cmd)}")
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True,  # noqa: ASYNC221
                       capture_output=True)
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        while await depth(url, queue) < n:
            await asyncio.sleep(0.5)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True,  # noqa: ASYNC221
                       capture_output=True)
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
        await asyncio.to_thread(proc.communicate, timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    total = 0
    for dump in benchlib.CACHE.glob(out.name + "*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
        dump.unlink()
    return total


async def main(a: argparse.Namespace) -> None:
    import aio_pika

    print(benchlib.machine())
    template = None if a.database_url else benchlib.directory_db(a.customers)
    run = uuid.uuid4().hex[:6]
    bodies = [make_body(i, 0.7, a.customers, run, len(limit_sample(0))) for i in range(a.n)]
    with benchlib.fresh_vhost() as url:
        forwarder = None
        if not a.skip_forwarder:
            conn = await aio_pika.connect(url)
            channel = await conn.channel(publisher_confirms=True)
            quorum = {"x-queue-type": "quorum"}  # as the router's queues
            into = await channel.declare_exchange("fwd.in", aio_pika.ExchangeType.TOPIC)
            out = await channel.declare_exchange("fwd.out", aio_pika.ExchangeType.TOPIC)
            q_in = await channel.declare_queue("fwd.in.q", durable=True, arguments=quorum)
            q_out = await channel.declare_queue("fwd.out.q", durable=True, arguments=quorum)
            await q_in.bind(into, "#")
            await q_out.bind(out, "#")
            for start in range(0, a.n, 256):
                await asyncio.gather(*(
                    into.publish(aio_pika.Message(body, delivery_mode=2), routing_key="email")
                    for body in bodies[start:start + 256]))
            await conn.close()
            cmd = [sys.executable, str(HERE / "instructions.py"), "--forwarder-child",
                   "--url", url, "--prefetch", str(a.prefetch)]
            forwarder = await count(cmd, url, "fwd.out.q", a.n, f"fwd-{run}")
        db_url, copy = fresh_db(template, run, a.database_url)
        try:
            await preload(url, bodies)
            cmd = [sys.executable, str(HERE / "throughput.py"), "--child", "--url", url,
                   "--database-url", db_url, "--prefetch", str(a.prefetch)]
            router = await count(cmd, url, "omniroute.routed", a.n, f"router-{run}")
        finally:
            if copy is not None:
                for p in (copy, Path(f"{copy}-wal"), Path(f"{copy}-shm")):
                    p.unlink(missing_ok=True)
    line = f"messages {a.n}, prefetch {a.prefetch}: router {router / a.n:,.0f} instructions/message"
    if forwarder is not None:
        line += (f", forwarder {forwarder / a.n:,.0f} instructions/message, "
                 f"router/forwarder {router / forwarder:.3f}")
    print(line)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--prefetch", type=int, default=256)
    p.add_argument("--skip-forwarder", action="store_true")
    p.add_argument("--database-url", default=None, help="an imported directory (default: SQLite)")
    p.add_argument("--forwarder-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.forwarder_child:
        asyncio.run(forwarder_child(a.url, a.prefetch))
    else:
        asyncio.run(main(a))
