"""(c) The broker connection cut, then stalled, by a TCP proxy between daemon and broker.

The daemon (router) reaches RabbitMQ only through a loopback proxy; 5,000 inbound messages
wait on ``omniroute.router`` (published directly). While they flow, the proxy first cuts
every connection and refuses new ones for ``--cut`` seconds, then (once routing resumed)
freezes the open connections without closing them. A stalled connection must be noticed
within two heartbeats (``bus.heartbeat``, set to ``--heartbeat`` here); the daemon then
reconnects through the proxy, which lets new connections through.

    .venv/bin/python bench/faults/broker_proxy.py [--messages 5000] [--heartbeat 3] [--cut 3]
"""

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import (  # noqa: E402
    AMQP_HOST,
    Collector,
    Daemon,
    Vhost,
    counters,
    inbound_messages,
    open_bus,
    publish_all,
    report,
    seed_directory,
    wait_until,
)
from bench.faults.proxy import FaultProxy  # noqa: E402


async def scenario(n: int, heartbeat: int, cut_s: float, workdir: Path) -> dict[str, object]:
    host, port = AMQP_HOST.rsplit(":", 1)
    proxy = FaultProxy(host, int(port))
    await proxy.start()
    with Vhost("proxy") as vhost:
        db = f"sqlite:///{workdir}/directory.db"
        await seed_directory(db)
        bus = open_bus(vhost.url())
        await bus.open()
        collector = Collector(vhost.url(), key=lambda r: r.message.id)
        daemon = Daemon(
            workdir,
            vhost.url(f"127.0.0.1:{proxy.port}"),
            db,
            toml=f"[bus]\nheartbeat = {heartbeat}\nconnect_timeout = 3\npublish_timeout = 5",
        )
        try:
            messages = inbound_messages(n, "proxy")
            await publish_all(bus, messages)
            offered = {m.id for m in messages}
            await collector.start()
            daemon.start("router")
            await wait_until(lambda: len(collector.counts) >= n // 10, 60, "routing to start")

            # 1. cut: every connection dropped, new ones refused for cut_s
            cut_start = time.monotonic()
            await proxy.cut()
            await asyncio.sleep(cut_s)
            await proxy.start()
            cut_end = time.monotonic()
            await wait_until(lambda: collector.routed_after(cut_end), 60, "routing after the cut")
            cut_recover = collector.routed_after(cut_end)
            assert cut_recover is not None

            # 2. stall: open connections freeze, nothing is closed
            await wait_until(lambda: len(collector.counts) >= n // 2, 60, "half routed")
            lost_before = len(daemon.events("bus.connection_lost"))
            stall_start = time.monotonic()
            stalled = proxy.stall()
            await wait_until(
                lambda: len(daemon.events("bus.connection_lost")) > lost_before,
                heartbeat * 6,
                "the daemon to notice the stalled connection",
            )
            noticed = time.monotonic()
            await proxy.drop_stalled()  # the dead NAT entry finally goes away
            await wait_until(lambda: collector.routed_after(noticed), 60, "routing after stall")
            stall_recover = collector.routed_after(noticed)
            assert stall_recover is not None

            await wait_until(lambda: offered <= collector.counts.keys(), 90, "every message")
            await asyncio.sleep(1.0)
            daemon.kill(signal.SIGTERM)
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill(signal.SIGKILL)
            await collector.close()
            await bus.close()
            await proxy.close()
        detect = noticed - stall_start
        return counters(
            "broker_proxy",
            offered,
            collector,
            fault_start=cut_start,
            fault_end=cut_end,
            extra={
                "heartbeat_s": heartbeat,
                "cut_recover_s": round(cut_recover - cut_end, 2),
                "stalled_connections": stalled,
                "stall_noticed_s": round(detect, 2),
                "stall_noticed_in_heartbeats": round(detect / heartbeat, 2),
                "stall_recover_s": round(stall_recover - stall_start, 2),
                "ok": detect <= 2 * heartbeat + 0.5,
                "tracebacks": daemon.tracebacks(),
            },
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--heartbeat", type=int, default=3)
    parser.add_argument("--cut", type=float, default=3.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omniroute-fault-") as tmp:
        result = asyncio.run(
            asyncio.wait_for(scenario(args.messages, args.heartbeat, args.cut, Path(tmp)), 170)
        )
    return report(result)


if __name__ == "__main__":
    sys.exit(main())
