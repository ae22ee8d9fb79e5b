"""(a) SIGKILL of the daemon during a flow of 5,000 messages.

5,000 inbound messages (known customers, a stranger, unparsable numbers) wait on
``omniroute.router``; the daemon's router takes them, is killed with SIGKILL once about
1,000 are routed, and is started again. Nothing acked before the routed publish was
confirmed, so every message must be routed; the ones in flight at the kill may be routed
twice (at-least-once), which the counters show.

    .venv/bin/python bench/faults/sigkill.py [--messages 5000]
"""

import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.harness import Result, options, run, set_up  # noqa: E402
from ingest.topology import ROUTER_QUEUE  # noqa: E402


async def scenario(n: int, workdir: Path) -> Result:
    async with set_up("sigkill", workdir, messages=n) as stage:
        stage.daemon.start("router")
        await stage.wait_routed(n // 5, "the first routed")
        fault_start = time.monotonic()
        stage.daemon.kill(signal.SIGKILL)
        left, _ = await stage.bus.queue_depth(ROUTER_QUEUE)
        routed_at_kill = stage.routed
        stage.daemon.start("router")
        fault_end = time.monotonic()
        await stage.wait_all_routed()
        done = time.monotonic()
        await stage.settle_and_stop()  # late duplicates, if any, arrive now
    return stage.counters(
        fault_start,
        fault_end,
        routed_at_kill=routed_at_kill,
        waiting_at_kill=left,
        drain_after_restart_s=round(done - fault_end, 2),
    )


def main() -> int:
    args = options(__doc__, messages=5000)
    return run(lambda workdir: scenario(args.messages, workdir), 150)


if __name__ == "__main__":
    sys.exit(main())
