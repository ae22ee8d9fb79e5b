"""The local spool: accepted input survives a broker outage, a restart and a torn file."""

import asyncio
import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from connectors.settings import SpoolSettings
from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.metrics import Metrics
from ingest.schema import Identity, InboundMessage
from ingest.sink import BusSink
from ingest.spool import SpooledSink, SpoolFull
from ingest.topology import ROUTER_QUEUE
from tests.phone_fixtures import ACCOUNT_SID, BUS_SETTINGS, AppFactory
from tests.support.broker import AMQP_HOST, take
from tests.support.net import TcpProxy, free_port
from tests.support.waiting import until


def sms(message_sid: str) -> dict[str, str]:
    return {
        "MessageSid": message_sid,
        "AccountSid": ACCOUNT_SID,
        "From": "+905321112233",
        "Body": message_sid,
    }


def sid(n: int) -> str:
    """A MessageSid of Twilio's documented form (the webhook refuses any other)."""
    return f"SM{n:032x}"


def message(n: int) -> InboundMessage:
    return InboundMessage(
        channel="sms", external_id=f"SM{n:032d}", sender=Identity(kind="phone", address="+1555")
    )


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("*.msg"))


async def unreachable_bus(vhost: str) -> Bus:
    bus = Bus(f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}", BUS_SETTINGS)
    with pytest.raises(TransientError):
        await bus.open()
    return bus


async def test_webhooks_answer_200_while_broker_is_away_and_spool_drains_when_back(
    make_phones: AppFactory, phone_vhost: str, tmp_path: Path
) -> None:
    """An outage of the broker loses no SMS and refuses none; order is kept."""
    host, port = AMQP_HOST.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{phone_vhost}?reconnect_interval=0.2"
    bus = Bus(url, BUS_SETTINGS, name="through-proxy")
    await bus.open()
    phones = await make_phones(
        sink_bus=bus,
        spool_settings=SpoolSettings(publish_timeout=2.0, retry_initial=0.1, retry_max=0.3),
    )
    stop = asyncio.Event()
    drain = asyncio.create_task(phones.spool.drain(stop))
    try:
        ok = await phones.twilio("/webhooks/twilio/sms", sms(sid(100)))
        assert ok.status_code == 200
        await proxy.cut()
        sids = [sid(101 + i) for i in range(3)]
        for outage_sid in sids:
            response = await phones.twilio("/webhooks/twilio/sms", sms(outage_sid))
            assert response.status_code == 200, response.text
        assert phones.spool.depth == 3
        assert len(entries(phones.spool.directory)) == 3
        assert b"omniroute_spool_depth 3.0" in phones.metrics.render()
        ready = await phones.client.get("/readyz")
        assert ready.json()["spool_depth"] == 3

        await proxy.start()  # the broker is back
        deliveries = await take(phones.bus, ROUTER_QUEUE, 4, timeout=20)
        received = [InboundMessage.model_validate_json(d.body).external_id for d in deliveries]
        assert received == [sid(100), *sids]
        await until(lambda: not phones.spool.depth, 5, "the spool emptied")
        assert entries(phones.spool.directory) == []
    finally:
        stop.set()
        await drain
        await bus.close()
        await proxy.cut()


async def test_spool_survives_restart_and_skips_a_torn_entry(
    phone_bus: Bus, phone_vhost: str, tmp_path: Path
) -> None:
    """What was fsynced before a crash is delivered after it; a damaged entry is set aside."""
    settings = SpoolSettings(publish_timeout=1.0)
    down = SpooledSink(BusSink(await unreachable_bus(phone_vhost)), tmp_path, settings, Metrics())
    for n in (1, 2, 3):
        await down.submit(message(n))
    assert down.depth == 3
    second = tmp_path / "000000000002.msg"
    second.write_bytes(second.read_bytes()[:-7])  # torn: the tail never reached the disk
    (tmp_path / ".000000000004.tmp").write_bytes(b"half a wri")  # crashed before rename

    restarted = SpooledSink(BusSink(phone_bus), tmp_path, settings, Metrics())
    await restarted.open()
    assert restarted.depth == 3
    assert not (tmp_path / ".000000000004.tmp").exists()
    assert await restarted.flush() == 2
    deliveries = await take(phone_bus, ROUTER_QUEUE, 2)
    assert [InboundMessage.model_validate_json(d.body).external_id for d in deliveries] == [
        message(1).external_id,
        message(3).external_id,
    ]
    assert restarted.depth == 0
    assert (tmp_path / "000000000002.corrupt").exists()
    assert entries(tmp_path) == []
    # numbering goes on after what is on disk, so nothing set aside is ever overwritten
    down_again = SpooledSink(
        BusSink(await unreachable_bus(phone_vhost)), tmp_path, settings, Metrics()
    )
    await down_again.submit(message(5))
    assert entries(tmp_path) == ["000000000003.msg"]


async def test_full_spool_answers_503_and_is_not_ready(
    make_phones: AppFactory, phone_vhost: str
) -> None:
    """A bounded spool refuses input loudly (Twilio retries) instead of filling the disk."""
    phones = await make_phones(
        sink_bus=await unreachable_bus(phone_vhost),
        spool_settings=SpoolSettings(max_messages=2, publish_timeout=1.0),
    )
    phones.health.add_probe("spool", "spool", phones.spool.probe)
    for n in (1, 2):
        assert (await phones.twilio("/webhooks/twilio/sms", sms(sid(n)))).status_code == 200
    refused = await phones.twilio("/webhooks/twilio/sms", sms(sid(3)))
    assert refused.status_code == 503
    with pytest.raises(SpoolFull):
        await phones.spool.submit(message(9))
    ready = await phones.client.get("/readyz")
    assert ready.status_code == 503
    assert any(p.startswith("spool: full") for p in ready.json()["problems"])
    # the refused MessageSid was forgotten: Twilio's retry is tried again, not taken for a
    # duplicate (which would answer 200 for a message that was never kept)
    retry = await phones.twilio("/webhooks/twilio/sms", sms(sid(3)))
    assert retry.status_code == 503


class _HeldWriteExecutor(ThreadPoolExecutor):
    """The loop's default executor, holding back the spool's write of entry 1 until
    released: the order in which threads finish, made deterministic."""

    def __init__(self) -> None:
        super().__init__(max_workers=4)
        self.release = threading.Event()

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        # asyncio.to_thread submits partial(ctx.run, func, *args)
        inner: tuple[Any, ...] = getattr(fn, "args", ())
        if len(inner) >= 3 and getattr(inner[0], "__name__", "") == "_write" and inner[2] == 1:
            held = fn

            def fn() -> Any:
                self.release.wait(timeout=30)
                return held()

        return super().submit(fn, *args, **kwargs)


async def test_drain_waits_for_an_earlier_write_in_flight_instead_of_spinning(
    phone_vhost: str, tmp_path: Path
) -> None:
    """Entry 2 on disk while entry 1 is still being written: the drain must wait for the
    write, not call flush again at once (which starved HTTP, IMAP and the router)."""
    loop = asyncio.get_running_loop()
    executor = _HeldWriteExecutor()
    loop.set_default_executor(executor)
    host, port = AMQP_HOST.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    await proxy.start()
    bus = Bus(
        f"amqp://guest:guest@127.0.0.1:{proxy.port}/{phone_vhost}?reconnect_interval=0.2",
        BUS_SETTINGS,
        name="through-proxy",
    )
    await bus.open()
    spool = SpooledSink(
        BusSink(bus),
        tmp_path,
        SpoolSettings(publish_timeout=1.0, retry_initial=0.05, retry_max=0.1),
        Metrics(),
    )
    await spool.open()
    stop = asyncio.Event()
    ticks: list[float] = []
    stuck = threading.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    def watchdog() -> None:
        # on the old code the loop never runs again: end the drain from here, so the test
        # fails with a reason instead of hanging (nothing else runs on the loop meanwhile)
        for _ in range(40):
            time.sleep(0.1)
            if ticks and time.monotonic() - ticks[-1] > 1.5:
                stuck.set()
                stop.set()
                return

    beat = asyncio.create_task(heartbeat())
    try:
        await proxy.cut()
        first = asyncio.create_task(spool.submit(message(1)))  # its write is held
        await until(lambda: spool.depth, 10, "message 1 spooled")
        await spool.submit(message(2))  # spooled behind it, and on disk
        assert entries(tmp_path) == ["000000000002.msg"]
        await proxy.start()
        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()
        drain = asyncio.create_task(spool.drain(stop))
        await asyncio.sleep(0.5)
        assert not stuck.is_set(), "the event loop was starved by the drain"
        assert spool.depth == 2  # entry 2 waits for entry 1: the order is kept
        executor.release.set()
        await first
        deliveries = await take(bus, ROUTER_QUEUE, 2, timeout=10)
        assert [InboundMessage.model_validate_json(d.body).external_id for d in deliveries] == [
            message(1).external_id,
            message(2).external_id,
        ]
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f} s"
    finally:
        executor.release.set()
        stop.set()
        await beat
        if "drain" in locals():
            await drain
        await bus.close()
        await proxy.cut()
