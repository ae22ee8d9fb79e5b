#!/usr/bin/env python3
"""omniroute's own bare forwarder: the ceiling a router stage can reach on this broker.

Built the way ``../shared/bench/limit_forwarder.py`` is. Phase 1 (not timed) loads N
persistent JSON messages into a durable queue; phase 2 (timed) consumes them with manual
acks and a prefetch window, decodes each body, publishes it on to a second exchange as a
persistent message with publisher confirms, and acks the original only after the confirm.
No work in between. ``bench/throughput.py`` runs it in the same run as the router, on the
same broker, with the router's own message bodies, and divides.

``--queue-type quorum`` declares both queues as quorum queues (omniroute's default
``bus.queue_type``) instead of limit_forwarder's classic queues, to show what the queue type
alone costs.

``forward_processes`` runs the same loop in N processes on one queue: the ceiling for N
router processes (issue 18's scale-out efficiency).

Usage: forwarder.py [--url amqp://guest:guest@127.0.0.1/] [-n 20000] [--prefetch 256]
"""

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import aio_pika


def limit_sample(i: int) -> bytes:
    """limit_forwarder.py's message, byte for byte the same shape and size."""
    return json.dumps({
        "id": str(uuid.uuid4()), "channel": "email", "received_at": "2026-11-23T07:00:00Z",
        "sender": {"kind": "email", "value": f"customer{i % 5000}@example.com"},
        "subject": "Modemim calismiyor", "body": "x" * 700, "thread": {"in_reply_to": None},
    }).encode()


async def _preloaded(channel: aio_pika.abc.AbstractChannel, tag: str, n: int,
                     body: Callable[[int], bytes], args: dict[str, str] | None
                     ) -> tuple[aio_pika.abc.AbstractQueue, aio_pika.abc.AbstractQueue]:
    """Run ``tag``'s exchanges and queues (fwd.in.*, fwd.out.*) with ``n`` bodies waiting on
    the input queue; (input queue, output queue)."""
    ex_in = await channel.declare_exchange(f"fwd.in.{tag}", aio_pika.ExchangeType.TOPIC,
                                           auto_delete=True)
    ex_out = await channel.declare_exchange(f"fwd.out.{tag}", aio_pika.ExchangeType.TOPIC,
                                            auto_delete=True)
    q_in = await channel.declare_queue(f"fwd.in.q.{tag}", durable=True, arguments=args)
    q_out = await channel.declare_queue(f"fwd.out.q.{tag}", durable=True, arguments=args)
    await q_in.bind(ex_in, "#")
    await q_out.bind(ex_out, "#")
    for i in range(0, n, 512):
        await asyncio.gather(*(
            ex_in.publish(aio_pika.Message(body(j), delivery_mode=2), routing_key="inbound.email")
            for j in range(i, min(i + 512, n))))
    return q_in, q_out


async def forward(url: str, n: int, prefetch: int, body: Callable[[int], bytes] = limit_sample,
                  *, queue_type: str = "classic", quiet: bool = False,
                  cpu: list[float] | None = None) -> float:
    """Preload ``n`` bodies, then time the consume-decode-publish-confirm-ack loop; msg/s.

    ``cpu`` gets the CPU seconds this process spent in the timed loop (all its threads).
    """
    tag = uuid.uuid4().hex[:8]
    args = {"x-queue-type": "quorum"} if queue_type == "quorum" else None
    conn = await aio_pika.connect_robust(url)
    try:
        setup = await conn.channel(publisher_confirms=True)
        q_in, q_out = await _preloaded(setup, tag, n, body, args)  # phase 1: not timed

        fwd = await conn.channel(publisher_confirms=True)
        await fwd.set_qos(prefetch_count=prefetch)
        ex_out = await fwd.get_exchange(f"fwd.out.{tag}")
        q = await fwd.get_queue(f"fwd.in.q.{tag}")
        done = asyncio.Event()
        forwarded = 0

        async def handle(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal forwarded
            decoded = json.loads(msg.body)
            await ex_out.publish(aio_pika.Message(json.dumps(decoded).encode(), delivery_mode=2),
                                 routing_key="team.x")
            await msg.ack()
            forwarded += 1
            if forwarded == n:
                done.set()

        t0, c0 = time.perf_counter(), time.process_time()  # phase 2: timed
        tag_consumer = await q.consume(handle)
        await done.wait()
        dt = time.perf_counter() - t0
        if cpu is not None:
            cpu.append(time.process_time() - c0)
        await q.cancel(tag_consumer)
        await q_in.delete(if_unused=False, if_empty=False)
        await q_out.delete(if_unused=False, if_empty=False)
        rate = n / dt
        if not quiet:
            print(f"forwarder ({queue_type}): {n} messages in {dt:.2f} s = {rate:.0f} msg/s")
        return rate
    finally:
        await conn.close()


async def forward_processes(url: str, n: int, prefetch: int, body: Callable[[int], bytes],
                            processes: int, *, cpu: list[float] | None = None) -> float:
    """``forward``'s loop in ``processes`` processes consuming one preloaded queue, released
    together and timed until all ``n`` are forwarded; msg/s. ``cpu`` gets their summed CPU
    seconds over the timed span."""
    tag = uuid.uuid4().hex[:8]
    # not robust: a robust channel answers a passive declare from its cache (count 0)
    conn = await aio_pika.connect(url)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ch = await conn.channel(publisher_confirms=True)
        q_in, q_out = await _preloaded(ch, tag, n, body, None)  # not timed
        for _ in range(processes):
            procs.append(subprocess.Popen(  # noqa: ASYNC220 (before the clock starts)
                [sys.executable, __file__, "--child", tag, "--url", url,
                 "--prefetch", str(prefetch)],
                stdin=subprocess.PIPE, stderr=subprocess.PIPE))
        for p in procs:
            assert p.stderr is not None
            line = await asyncio.to_thread(p.stderr.readline)
            if line.strip() != b"ready":
                raise SystemExit(f"forwarder process failed: {line!r}")
        t0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            p.stdin.flush()
        while True:
            q = await ch.declare_queue(f"fwd.out.q.{tag}", passive=True)
            if (q.declaration_result.message_count or 0) >= n:
                break
            if time.perf_counter() - t0 > 600:
                raise SystemExit("forwarders did not finish within 600 s")
            await asyncio.sleep(0.01)
        dt = time.perf_counter() - t0
        await q_in.delete(if_unused=False, if_empty=False)
        await q_out.delete(if_unused=False, if_empty=False)
    finally:
        spent = 0.0
        for p in procs:
            if p.poll() is None and p.stdin is not None:
                p.stdin.write(b"stop\n")
                p.stdin.flush()
            try:
                _, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                continue
            for line in err.decode(errors="replace").splitlines():
                if line.startswith("cpu "):
                    spent += float(line.split()[1])
        if cpu is not None:
            cpu.append(spent)
        await conn.close()
    return n / dt


async def _child(url: str, tag: str, prefetch: int) -> None:
    """One of ``forward_processes``' forwarders: says ready, waits for go, forwards until
    told to stop, then prints its CPU seconds since go."""
    conn = await aio_pika.connect_robust(url)
    try:
        fwd = await conn.channel(publisher_confirms=True)
        await fwd.set_qos(prefetch_count=prefetch)
        ex_out = await fwd.get_exchange(f"fwd.out.{tag}")
        q = await fwd.get_queue(f"fwd.in.q.{tag}")

        async def handle(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            decoded = json.loads(msg.body)
            await ex_out.publish(aio_pika.Message(json.dumps(decoded).encode(), delivery_mode=2),
                                 routing_key="team.x")
            await msg.ack()

        print("ready", file=sys.stderr, flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # go
        c0 = time.process_time()
        await q.consume(handle)
        await asyncio.to_thread(sys.stdin.readline)  # stop
        print(f"cpu {time.process_time() - c0}", file=sys.stderr, flush=True)
    finally:
        await conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1/"))
    p.add_argument("-n", type=int, default=20000)
    p.add_argument("--prefetch", type=int, default=256)
    p.add_argument("--queue-type", choices=["classic", "quorum"], default="classic")
    p.add_argument("--processes", type=int, default=1, help="forwarder processes on one queue")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        asyncio.run(_child(a.url, a.child, a.prefetch))
    elif a.processes > 1:
        rate = asyncio.run(forward_processes(a.url, a.n, a.prefetch, limit_sample, a.processes))
        print(f"forwarder x{a.processes} (classic): {a.n} messages, {rate:.0f} msg/s")
    else:
        asyncio.run(forward(a.url, a.n, a.prefetch, queue_type=a.queue_type))
