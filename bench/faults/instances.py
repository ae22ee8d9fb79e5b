"""(f) Three instances on one PostgreSQL directory, one of them SIGKILLed under load (issue 18).

Three ``omniroute run`` processes share one vhost and one PostgreSQL directory, as three
hosts would. 6,000 inbound messages wait on ``omniroute.router`` and 2,000 offers are
already due in the directory (an agent's message not accepted in time: each instance's
timer worker may take them, ``FOR UPDATE SKIP LOCKED``). Once about a fifth of the
messages are routed, the second instance is killed with SIGKILL and started again. Every
inbound message must be routed and every offer routed again (``<id>#2``): none lost; what
the killed instance had in flight may come twice (at-least-once), which the counters show,
with how many offers each instance fired.

    .venv/bin/python bench/faults/instances.py [--messages 6000] [--offers 2000]
"""

import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import Daemon, pg_directory  # noqa: E402
from bench.faults.harness import Result, options, run, set_up  # noqa: E402
from ingest.schema import Identity, InboundMessage, utcnow  # noqa: E402

#: an example customer and the agent their offers went to (config/examples)
OFFERED_TO = ("kemal.ozturk@example.com.tr", "c-1001", "mehmet")


async def due_offers(url: str, n: int) -> list[str]:
    """``n`` offers due a minute ago, written as the router's claim writes them; their ids."""
    from sqlalchemy import insert

    from routers.models import Assignment, RoutedRecord
    from routers.store.engine import create_engine

    address, customer, agent = OFFERED_TO
    at = utcnow() - timedelta(minutes=10)
    records, offers = [], []
    for i in range(n):
        message = InboundMessage(
            channel="email",
            external_id=f"<offer-{i}@instances.test>",
            sender=Identity(kind="email", address=address),
            text="Faturam nerede?",
        )
        body = message.model_dump_json()
        records.append(
            {
                "id": message.id,
                "channel": "email",
                "external_id": message.external_id,
                "thread_message_id": None,
                "customer_id": customer,
                "route_kind": "agent",
                "route_target": agent,
                "reason": "last_agent",
                "routed_at": at,
                "message": body,
            }
        )
        offers.append(
            {
                "message_id": message.id,
                "agent_id": agent,
                "customer_id": customer,
                "channel": "email",
                "assigned_at": at,
                "closed_at": None,
                "offer_due_at": at + timedelta(minutes=9),
                "accepted_at": None,
                "outcome": None,
                "attempt": 1,
                "message": body,
            }
        )
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(insert(RoutedRecord), records)
            await connection.execute(insert(Assignment), offers)
    finally:
        await engine.dispose()
    return [str(r["id"]) for r in records]


async def scenario(n: int, offers: int, workdir: Path) -> Result:
    async with (
        pg_directory() as database_url,
        set_up("instances", workdir / "a", messages=n, database_url=database_url) as stage,
    ):
        a = stage.daemon
        b = Daemon(workdir / "b", a.amqp_url, database_url)
        c = Daemon(workdir / "c", a.amqp_url, database_url)
        stage.offered |= set(await due_offers(database_url, offers))
        for daemon in (a, b, c):
            daemon.start()
        try:
            await stage.wait_routed((n + offers) // 5, "the first routed")
            fault_start = time.monotonic()
            b.kill(signal.SIGKILL)
            routed_at_kill = stage.routed
            b.start()
            fault_end = time.monotonic()
            await stage.wait_all_routed()
            done = time.monotonic()
            await stage.settle_and_stop()  # stops a; late duplicates arrive meanwhile
        finally:
            for daemon in (b, c):
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.kill(signal.SIGTERM)
        fired = [len(d.events("offers.rerouted")) for d in (a, b, c)]
        tracebacks = b.tracebacks() + c.tracebacks()
        result = stage.counters(
            fault_start,
            fault_end,
            routed_at_kill=routed_at_kill,
            offers_due=offers,
            offers_fired_by_instance=fired,
            drain_after_restart_s=round(done - fault_end, 2),
        )
        result["tracebacks"] += tracebacks
        result["ok"] = all(fired[i] > 0 for i in (0, 2))  # the survivors both took offers
        return result


def main() -> int:
    args = options(__doc__, messages=6000, offers=2000)
    return run(lambda workdir: scenario(args.messages, args.offers, workdir), 240)


if __name__ == "__main__":
    sys.exit(main())
