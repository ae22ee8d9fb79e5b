"""(c) The broker connection cut, then stalled, by a TCP proxy between daemon and broker.

The daemon (router) reaches RabbitMQ only through a loopback proxy; 5,000 inbound messages
wait on ``omniroute.router`` (published directly). While they flow, the proxy first cuts
every connection and refuses new ones for ``--cut`` seconds, then (once routing resumed)
freezes the open connections without closing them. A stalled connection must be noticed
within two heartbeats (``bus.heartbeat``, set to ``--heartbeat`` here); the daemon then
reconnects through the proxy, which lets new connections through.

    .venv/bin/python bench/faults/broker_proxy.py [--messages 5000] [--heartbeat 5] [--cut 3]
"""

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import AMQP_HOST, wait_until  # noqa: E402
from bench.faults.harness import Result, options, run, set_up  # noqa: E402
from bench.faults.proxy import FaultProxy  # noqa: E402


async def scenario(n: int, heartbeat: int, cut_s: float, workdir: Path) -> Result:
    host, port = AMQP_HOST.rsplit(":", 1)
    async with (
        FaultProxy(host, int(port)) as proxy,
        set_up(
            "broker_proxy",
            workdir,
            messages=n,
            daemon_amqp_host=f"127.0.0.1:{proxy.port}",
            toml=f"[bus]\nheartbeat = {heartbeat}\nconnect_timeout = 3\npublish_timeout = 5",
        ) as stage,
    ):
        stage.daemon.start("router")
        await stage.wait_routed(n // 10, "routing to start")

        # 1. cut: every connection dropped, new ones refused for cut_s
        cut_start = time.monotonic()
        await proxy.cut()
        await asyncio.sleep(cut_s)
        await proxy.start()
        cut_end = time.monotonic()
        cut_recover = await stage.first_routed_after(cut_end, "routing after the cut")

        # 2. stall: open connections freeze, nothing is closed
        await stage.wait_routed(n // 2, "half routed")
        lost_before = len(stage.daemon.events("bus.connection_lost"))
        stall_start = time.monotonic()
        stalled = proxy.stall()
        await wait_until(
            lambda: len(stage.daemon.events("bus.connection_lost")) > lost_before,
            heartbeat * 6,
            "the daemon to notice the stalled connection",
        )
        noticed = time.monotonic()
        await proxy.drop_stalled()  # the dead NAT entry finally goes away
        stall_recover = await stage.first_routed_after(noticed, "routing after stall")

        await stage.wait_all_routed()
        await stage.settle_and_stop()
    detect = noticed - stall_start
    return stage.counters(
        cut_start,
        cut_end,
        heartbeat_s=heartbeat,
        cut_recover_s=round(cut_recover - cut_end, 2),
        stalled_connections=stalled,
        stall_noticed_s=round(detect, 2),
        stall_noticed_in_heartbeats=round(detect / heartbeat, 2),
        stall_recover_s=round(stall_recover - stall_start, 2),
        ok=detect <= 2 * heartbeat + 0.5,
    )


def main() -> int:
    args = options(__doc__, messages=5000, heartbeat=5, cut=3.0)
    return run(lambda workdir: scenario(args.messages, args.heartbeat, args.cut, workdir), 170)


if __name__ == "__main__":
    sys.exit(main())
