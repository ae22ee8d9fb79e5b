"""(g) A broker node lost under load, on a three-node RabbitMQ cluster of the scenario's own.

Three RabbitMQ nodes start on loopback from Debian's ``rabbitmq-server`` (their own names,
ports, data and cookie: the machine's broker on 5672 is never touched) and join one cluster;
omniroute's topology is declared there (quorum queues, three replicas each). The daemon
(router) gets all three nodes in ``amqp_url``; a client offers InboundMessages at ``--rate``
per second, itself connected to the node that will stop, retrying a publish whose confirm
never came. After ``--before`` seconds one node stops (``rabbitmqctl stop_app``):

- ``connected``: the node the daemon is connected to;
- ``router_leader``: the node leading ``omniroute.router``;
- ``paused``: the node the daemon is connected to, paused with SIGSTOP for ``--pause``
  seconds and resumed (SIGCONT): a partition, its sockets open and silent; the daemon's
  ``bus.heartbeat`` is 5, so it notices within 10 s and moves to another node.

The daemon is never on the node leading ``omniroute.router`` (started again until it is
not), so that each victim is one fault. The load goes on ``--after`` seconds; every
offered message must be routed, and the node starts again before the next victim.
Counters per victim (``cluster_node_loss_<victim>``).

    .venv/bin/python bench/faults/cluster_node_loss.py [--rate 200] [--before 5] [--after 10]
        [--pause 15] [--victims connected,router_leader,paused]

The daemon's log of each victim is kept as ``results/cluster_node_loss_<victim>.daemon.log``.
"""

import asyncio
import shutil
import signal
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import RESULTS, Daemon, report, sqlite_directory, wait_until  # noqa: E402
from bench.faults.harness import options  # noqa: E402
from ingest.bus import Bus  # noqa: E402
from ingest.settings import BusSettings  # noqa: E402
from ingest.topology import QUEUES, ROUTER_QUEUE  # noqa: E402
from tests.support.cluster import Cluster, available, running_cluster  # noqa: E402
from tests.support.traffic import connected_to, node_loss, outage  # noqa: E402

VICTIMS = ("connected", "router_leader", "paused")
#: heartbeat 5: a paused node is noticed within 10 s
TOML = "[bus]\npublish_timeout = 5\nconnect_timeout = 5\nheartbeat = 5"


async def one(
    cluster: Cluster, vhost: str, victim: str, workdir: Path, args: Any
) -> dict[str, Any]:
    """One victim: the daemon started (again, until it is not on the node leading
    ``omniroute.router``), the node stopped or paused under load, the daemon stopped with
    SIGTERM."""
    database_url = await sqlite_directory(workdir)
    # the leader's loss alone, or the daemon's node's alone: never both at once
    avoid = cluster.leader(ROUTER_QUEUE, vhost)
    for attempt in range(10):
        daemon = Daemon(workdir / f"daemon{attempt}", ",".join(cluster.urls(vhost)), database_url)
        daemon.toml = TOML
        daemon.start("router")
        await wait_until(partial(connected_to, daemon.log), 30, "connected")
        if avoid is None or connected_to(daemon.log) != f"127.0.0.1:{avoid.port}":
            break
        daemon.kill(signal.SIGTERM)
    try:
        result = await node_loss(
            cluster,
            vhost,
            victim,
            rate=args.rate,
            before=args.before,
            after=args.after,
            pause=args.pause,
        )
    finally:
        status = daemon.kill(signal.SIGTERM)
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(daemon.log, RESULTS / f"cluster_node_loss_{victim}.daemon.log")
    return {
        "scenario": f"cluster_node_loss_{victim}",
        **result,
        "daemon_outage_s": outage(daemon.log),
        "daemon_exit": status,
        "tracebacks": daemon.tracebacks(),
        "ok": status == 0,
    }


async def scenario(workdir: Path, args: Any) -> list[dict[str, Any]]:
    results = []
    began = time.monotonic()
    with running_cluster(workdir / "cluster") as cluster:
        started_s = round(time.monotonic() - began, 1)
        vhost = f"omniroute-fault-cluster-{uuid.uuid4().hex[:8]}"
        cluster.nodes[0].ctl("add_vhost", vhost)
        cluster.nodes[0].ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        bus = Bus(",".join(cluster.urls(vhost)), BusSettings(), name="fault-driver")
        await bus.open()  # the topology
        await bus.close()
        replicas = {queue: len(cluster.members(queue, vhost)) for queue in QUEUES}
        for victim in args.victims.split(","):
            result = await one(cluster, vhost, victim, workdir / victim, args)
            results.append({**result, "cluster_start_s": started_s, "replicas": replicas})
    return results


def main() -> int:
    if (why := available()) is not None:
        print(f"cluster_node_loss: not run: {why}", file=sys.stderr)
        return 1
    args = options(
        __doc__, rate=200.0, before=5.0, after=10.0, pause=15.0, victims=",".join(VICTIMS)
    )
    with tempfile.TemporaryDirectory(prefix="omniroute-fault-") as tmp:
        results = asyncio.run(asyncio.wait_for(scenario(Path(tmp), args), 300))
    return max(report(result) for result in results)


if __name__ == "__main__":
    sys.exit(main())
