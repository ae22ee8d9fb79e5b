"""Steady inbound load and a tally of what was routed, for the cluster scenarios (issue 18):
``Offer`` publishes InboundMessages to ``omniroute.inbound`` at a fixed rate through a bus of
its own, retrying a publish whose confirm never came (same message id: a duplicate at worst,
never a loss), and ``Tally`` counts every copy that reaches ``omniroute.routed``."""

import asyncio
import contextlib
import json
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.schema import Identity, InboundMessage, RoutedMessage
from ingest.settings import BusSettings
from ingest.topology import INBOUND, ROUTED_QUEUE, ROUTER_QUEUE
from tests.support.cluster import Cluster
from tests.support.waiting import until

#: known customers of the example directory and a stranger
SENDERS = [
    ("phone", "0532 111 22 33"),
    ("email", "Fatma.Arslan@Example.com"),
    ("phone", "+90 216 555 02 34"),
    ("email", "stranger@nowhere.example"),
]


def inbound(n: int, prefix: str) -> InboundMessage:
    kind, address = SENDERS[n % len(SENDERS)]
    return InboundMessage(
        channel="sms" if kind == "phone" else "email",
        external_id=f"{prefix}-{n}",
        sender=Identity(kind=kind, address=address),
        text=f"message {n}",
    )


class Offer:
    """Publishes ``rate`` messages a second until stopped; ``offered`` holds the external ids
    the broker confirmed, ``retries`` the publishes tried again."""

    def __init__(self, url: str, rate: float, prefix: str) -> None:
        self.url = url
        self.bus = self._bus()
        self.rate = rate
        self.prefix = prefix
        self.offered: set[str] = set()
        self.retries = 0
        self.stop = asyncio.Event()

    def _bus(self) -> Bus:
        settings = BusSettings(publish_timeout=5.0, connect_timeout=5.0, heartbeat=5)
        return Bus(self.url, settings, name="offer")

    async def open_on(self, node: str, attempts: int = 30) -> None:
        """Open the bus on ``node`` (``host:port``): the order of the nodes is shuffled at
        each open, so open again until it lands there."""
        for _ in range(attempts):
            await self.bus.open()
            if self.bus.node == node:
                return
            await self.bus.close()
            self.bus = self._bus()
        raise AssertionError(f"never connected to {node}")

    async def run(self) -> None:
        """Offer until stopped, on the opened bus; closes it."""
        try:
            started = time.monotonic()
            n = 0
            while not self.stop.is_set():
                await self._publish(inbound(n, self.prefix))
                n += 1
                await asyncio.sleep(max(0.0, started + n / self.rate - time.monotonic()))
        finally:
            await self.bus.close()

    async def _publish(self, message: InboundMessage) -> None:
        for _ in range(60):
            try:
                await self.bus.publish(INBOUND, message.channel, message, message_id=message.id)
                self.offered.add(message.external_id)
                return
            except TransientError:  # no confirm: the same message again, on whatever node
                self.retries += 1
                await asyncio.sleep(0.2)
        raise AssertionError(f"{message.external_id} never confirmed")


class Tally:
    """Every routed copy by external id, with when its first copy arrived (monotonic)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.counts: dict[str, int] = {}
        self.first_seen: dict[str, float] = {}
        self._connection: AbstractRobustConnection | None = None

    async def start(self) -> None:
        self._connection = await aio_pika.connect_robust(self._url + "?heartbeat=5")
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.get_queue(ROUTED_QUEUE)
        await queue.consume(self._on)

    async def _on(self, message: AbstractIncomingMessage) -> None:
        key = RoutedMessage.model_validate_json(message.body).message.external_id
        if not (key in self.counts and message.redelivered):  # our own lost ack: not a copy
            self.counts[key] = self.counts.get(key, 0) + 1
            self.first_seen.setdefault(key, time.monotonic())
        with contextlib.suppress(Exception):
            await message.ack()

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    def routed_after(self, t: float) -> float | None:
        later = [s for s in self.first_seen.values() if s >= t]
        return min(later) if later else None

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time between two routed messages (first copies) in ``[start, end]``."""
        times = sorted(s for s in self.first_seen.values() if start <= s <= end)
        edges = [start, *times, end]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))


def counters(offer: Offer, tally: Tally, **extra: Any) -> dict[str, Any]:
    """offered, routed, lost (goal 0), duplicated (allowed: at-least-once), unexpected."""
    seen = tally.counts
    return {
        "offered": len(offer.offered),
        "routed": len(offer.offered & seen.keys()),
        "lost": len(offer.offered - seen.keys()),
        "duplicated": sum(c - 1 for c in seen.values()),
        "unexpected": len(seen.keys() - offer.offered),
        "publish_retries": offer.retries,
        **extra,
    }


async def node_loss(
    cluster: Cluster,
    vhost: str,
    victim: str,
    *,
    daemon: str = "omniroute",
    rate: float = 100.0,
    before: float = 3.0,
    after: float = 4.0,
    pause: float = 15.0,
) -> dict[str, Any]:
    """Under steady load, stop (``stop_app``) one node of ``cluster``: the node the daemon
    (its connection named ``daemon``) is connected to (``victim="connected"``) or the leader
    of ``omniroute.router`` (``"router_leader"``); or pause the daemon's node with SIGSTOP for
    ``pause`` seconds and resume it (``"paused"``: a partition, noticed by heartbeats); wait
    until every offered message is routed, start the node again. The counters, with:

    The offering client is connected to the stopped node too: publishes it sent there whose
    confirm never came are sent again (``publish_retries``). ``reconnect_s``: from the start
    of the stop until the daemon is seen (by ``list_connections``, which takes about a second
    a node) on another node; ``recover_s``: from the end of the stop (the node
    down) to the first message routed after it; ``longest_gap_s``: the longest time without
    a routed message from the start of the stop until the end of the load.
    """
    urls = cluster.urls(vhost)
    was_on = await asyncio.to_thread(cluster.node_of, daemon)
    assert was_on is not None, "the daemon is connected to no node"
    if victim in ("connected", "paused"):
        target = was_on
    else:
        target = await asyncio.to_thread(cluster.leader, ROUTER_QUEUE, vhost)
    leaders = {
        queue: (await asyncio.to_thread(cluster.leader, queue, vhost)).name
        for queue in (ROUTER_QUEUE, ROUTED_QUEUE)
    }
    others = [node for node in cluster.nodes if node is not target]
    tally = Tally(cluster.url(others[0], vhost))
    await tally.start()
    offer = Offer(",".join(urls), rate, f"{victim}-{int(time.time())}")
    await offer.open_on(f"127.0.0.1:{target.port}")  # its publishes lose their node too
    load = asyncio.create_task(offer.run())
    try:
        await until(lambda: len(tally.counts) >= rate * before, before * 4, "steady routing")
        fault_start = time.monotonic()
        if victim == "paused":
            target.signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(pause)
            finally:
                target.signal(signal.SIGCONT)
        else:
            await asyncio.to_thread(target.stop_app)
        fault_end = time.monotonic()
        now_on = None

        def moved() -> bool:
            nonlocal now_on
            now_on = cluster.node_of(daemon)
            return now_on is not None and now_on is not target

        if victim in ("connected", "paused"):
            await until(lambda: asyncio.to_thread(moved), 30, "the daemon on another node")
        else:
            now_on = await asyncio.to_thread(cluster.node_of, daemon)
        reconnected = time.monotonic()
        await until(lambda: tally.routed_after(fault_end) is not None, 30, "routing again")
        await asyncio.sleep(after)
        offer.stop.set()
        await load
        load_end = time.monotonic()
        await until(lambda: offer.offered <= tally.counts.keys(), 60, "every message routed")
        await asyncio.sleep(1.0)  # late copies
        first_after = tally.routed_after(fault_end)
        assert first_after is not None
        result = counters(
            offer,
            tally,
            victim=victim,
            stopped=target.name,
            leaders_before=leaders,
            daemon_was_on=was_on.name,
            daemon_now_on=now_on.name if now_on is not None else None,
            recovered=sum(1 for k in offer.offered if tally.first_seen[k] >= fault_start),
            stop_s=round(fault_end - fault_start, 2),
            reconnect_s=round(reconnected - fault_start, 2) if victim == "connected" else None,
            pause_s=pause if victim == "paused" else None,
            recover_s=round(first_after - fault_end, 2),
            longest_gap_s=round(tally.longest_gap(fault_start, load_end), 2),
        )
    finally:
        offer.stop.set()
        with contextlib.suppress(Exception):
            await load
        await tally.close()
        if victim != "paused":
            await asyncio.to_thread(target.start_app)
    return result


def outage(log: Path) -> float | None:
    """Seconds between the daemon's ``bus.connection_lost`` and its ``bus.reconnected`` (its
    JSON log, read once the daemon has stopped), or None without both."""
    stamps: dict[str, datetime] = {}
    for line in log.read_text(errors="replace").splitlines():
        if '"bus.connection_lost"' in line or '"bus.reconnected"' in line:
            entry = json.loads(line)
            stamps.setdefault(entry["event"], datetime.fromisoformat(entry["timestamp"]))
    if len(stamps) < 2:
        return None
    return round((stamps["bus.reconnected"] - stamps["bus.connection_lost"]).total_seconds(), 3)


def connected_to(log: Path) -> str | None:
    """The node (``host:port``) of the daemon's first ``bus.connected`` in its JSON log."""
    for line in log.read_text(errors="replace").splitlines():
        if '"bus.connected"' in line:
            node: str = json.loads(line)["node"]
            return node
    return None
