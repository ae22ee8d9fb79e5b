"""RabbitMQ's CPU per message for two publish shapes, in fresh vhosts of the machine's
broker: omniroute's (``Bus.publish`` of an email ``InboundMessage`` onto
``omniroute.inbound``, a topic exchange, persistent, mandatory, with message id, type,
timestamp and user id, omniroute's quorum-queue topology) and a bare one (aiormq onto the
default exchange into one quorum queue, content type and delivery mode only), ``--batch``
(50) confirmed publishes at a time.

Sole purpose: tell whether what omniroute publishes costs the broker more than a bare
publish of the same size, apart from everything else an intake runs beside it.
``--busy K`` keeps K busy-looping processes running meanwhile: what the broker costs
when the machine's cores are taken by other work (an intake's parse workers).

    .venv/bin/python bench/broker_cost.py [-n 10000] [--rounds 2] [--batch 50] [--busy 0]

Reads the broker's CPU from ``/proc/<beam.smp pid>/stat``, so run it on the broker's
machine (as root, or as the broker's user). Benchmarks are never tests: this prints.
"""

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiormq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import fresh_vhost  # noqa: E402
from email_parse import KWARGS, mails  # noqa: E402

from connectors.email.mime import normalise  # noqa: E402
from ingest.bus import Bus  # noqa: E402
from ingest.schema import InboundMessage  # noqa: E402
from ingest.settings import BusSettings  # noqa: E402
from ingest.sink import BusSink  # noqa: E402

BATCH = 50


def broker_seconds() -> float:
    pid = subprocess.run(
        ["pgrep", "-o", "beam.smp"], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed(
    publish: Callable[[int], Awaitable[None]], n: int, batch: int = BATCH
) -> tuple[float, float]:
    """(messages a second, broker CPU ms a message) of n publishes, ``batch`` at a time."""
    busy, started = broker_seconds(), time.perf_counter()
    for start in range(0, n, batch):
        await asyncio.gather(*(publish(i) for i in range(start, min(start + batch, n))))
    seconds = time.perf_counter() - started
    return n / seconds, (broker_seconds() - busy) / n * 1000


async def omniroute_shape(messages: list[InboundMessage], batch: int) -> tuple[float, float]:
    with fresh_vhost() as url:
        bus = Bus(url, BusSettings(), name="bench")
        await bus.open()
        try:
            sink = BusSink(bus)
            return await timed(lambda i: sink.submit(messages[i]), len(messages), batch)
        finally:
            await bus.close()


async def bare_shape(bodies: list[bytes], batch: int) -> tuple[float, float]:
    with fresh_vhost() as url:
        connection = await aiormq.connect(url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.queue_declare("bench", durable=True, arguments={"x-queue-type": "quorum"})
            properties = aiormq.spec.Basic.Properties(
                content_type="application/json", delivery_mode=2
            )

            async def publish(i: int) -> None:
                await channel.basic_publish(
                    bodies[i], exchange="", routing_key="bench", properties=properties
                )

            return await timed(publish, len(bodies), batch)
        finally:
            await connection.close()


async def run(n: int, rounds: int, batch: int, busy: int) -> None:
    messages = [normalise(raw, **KWARGS) for raw in mails(n)]  # type: ignore[arg-type]
    bodies = [m.model_dump_json().encode() for m in messages]
    print(
        f"{n} messages of {sum(map(len, bodies)) // n} bytes, {batch} confirmed at a time, "
        f"{busy} busy-looping processes beside"
    )
    for _ in range(rounds):
        for name, shape in (
            ("omniroute (Bus.publish)", omniroute_shape(messages, batch)),
            ("bare aiormq", bare_shape(bodies, batch)),
        ):
            rate, broker_ms = await shape
            print(f"{name:24s} {rate:7.0f} msg/s, broker {broker_ms:.3f} ms CPU a message")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=BATCH, help="confirmed publishes at a time")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes beside")
    args = parser.parse_args()
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])  # noqa: S603
        for _ in range(args.busy)
    ]
    try:
        asyncio.run(run(args.n, args.rounds, args.batch, args.busy))
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


if __name__ == "__main__":
    main()
