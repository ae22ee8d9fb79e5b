"""(a) SIGKILL of the daemon during a flow of 5,000 messages.

5,000 inbound messages (known customers, a stranger, unparsable numbers) wait on
``omniroute.router``; the daemon's router takes them, is killed with SIGKILL once about
1,000 are routed, and is started again. Nothing acked before the routed publish was
confirmed, so every message must be routed; the ones in flight at the kill may be routed
twice (at-least-once), which the counters show.

    .venv/bin/python bench/faults/sigkill.py [--messages 5000]
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
from ingest.bus import ROUTER_QUEUE  # noqa: E402


async def scenario(n: int, workdir: Path) -> dict[str, object]:
    with Vhost("sigkill") as vhost:
        db = f"sqlite:///{workdir}/directory.db"
        await seed_directory(db)
        bus = open_bus(vhost.url())
        await bus.open()
        collector = Collector(vhost.url(), key=lambda r: r.message.id)
        daemon = Daemon(workdir, vhost.url(), db)
        try:
            messages = inbound_messages(n, "kill")
            await publish_all(bus, messages)
            offered = {m.id for m in messages}
            await collector.start()
            daemon.start("router")
            kill_at = n // 5
            await wait_until(lambda: len(collector.counts) >= kill_at, 60, "the first routed")
            fault_start = time.monotonic()
            daemon.kill(signal.SIGKILL)
            left, _ = await bus.queue_depth(ROUTER_QUEUE)
            routed_at_kill = len(collector.counts)
            daemon.start("router")
            fault_end = time.monotonic()
            await wait_until(lambda: offered <= collector.counts.keys(), 90, "every message")
            done = time.monotonic()
            await asyncio.sleep(1.0)  # late duplicates, if any, arrive now
            daemon.kill(signal.SIGTERM)
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill(signal.SIGKILL)
            await collector.close()
            await bus.close()
        return counters(
            "sigkill",
            offered,
            collector,
            fault_start=fault_start,
            fault_end=fault_end,
            extra={
                "routed_at_kill": routed_at_kill,
                "waiting_at_kill": left,
                "drain_after_restart_s": round(done - fault_end, 2),
                "tracebacks": daemon.tracebacks(),
            },
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omniroute-fault-") as tmp:
        result = asyncio.run(asyncio.wait_for(scenario(args.messages, Path(tmp)), 150))
    return report(result)


if __name__ == "__main__":
    sys.exit(main())
