"""(d) The PostgreSQL directory unreachable for a while (a TCP proxy cut, never a restart of
the shared server).

A fresh database on the local PostgreSQL holds the example directory; the daemon (router
and the PBX route API) reaches it only through a loopback proxy. While 3,000 inbound
messages are routed, the proxy drops every connection and refuses new ones for
``--outage`` seconds; meanwhile a PBX asks ``/v1/route`` five times a second. Messages
must wait (requeued, not dead-lettered) and all be routed once the database is back;
``/v1/route`` must keep answering (the ``api.default_dial`` fallback), never 500.

    .venv/bin/python bench/faults/db_proxy.py [--messages 3000] [--outage 10]
"""

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import (  # noqa: E402
    Collector,
    Daemon,
    Vhost,
    counters,
    create_pg_database,
    drop_pg_database,
    inbound_messages,
    open_bus,
    publish_all,
    report,
    seed_directory,
    wait_http,
    wait_until,
)
from bench.faults.proxy import FaultProxy  # noqa: E402
from ingest.bus import DEAD_QUEUE  # noqa: E402

TOKEN = "fault-scenario-token"  # noqa: S105 -- a throwaway token on loopback


async def ask_routes(port: int, stop: asyncio.Event, statuses: Counter[str]) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        while not stop.is_set():
            try:
                params = {"caller": "0532 111 22 33"}
                r = await client.get("/v1/route", params=params, headers=headers)
                reason = r.json()["route"]["reason"] if r.status_code == 200 else ""
                statuses[f"{r.status_code} {reason}".strip()] += 1
            except httpx.HTTPError as exc:
                statuses[type(exc).__name__] += 1
            await asyncio.sleep(0.2)


async def scenario(n: int, outage: float, workdir: Path) -> dict[str, object]:
    name, direct = await create_pg_database()
    pg = urlsplit(direct)
    proxy = FaultProxy(pg.hostname or "127.0.0.1", pg.port or 5432)
    await proxy.start()
    try:
        await seed_directory(direct)
        with Vhost("db") as vhost:
            bus = open_bus(vhost.url())
            await bus.open()
            collector = Collector(
                vhost.url(),
                key=lambda r: r.message.id,
                ignore=lambda r: r.message.channel == "voice",  # the PBX's calls
            )
            via_proxy = direct.replace(pg.netloc, f"{pg.username}@127.0.0.1:{proxy.port}")
            daemon = Daemon(
                workdir,
                vhost.url(),
                via_proxy,
                toml=f'[api]\ntoken = "{TOKEN}"\ndefault_dial = "+902125550199"\n'
                "decide_timeout = 1.0\n[directory]\nstatement_timeout = 2.0",
            )
            statuses: Counter[str] = Counter()
            stop_asking = asyncio.Event()
            try:
                messages = inbound_messages(n, "db")
                await publish_all(bus, messages)
                offered = {m.id for m in messages}
                await collector.start()
                daemon.start("router", "webhooks")
                await wait_http(daemon.http_port)
                asking = asyncio.create_task(ask_routes(daemon.http_port, stop_asking, statuses))
                await wait_until(lambda: len(collector.counts) >= n // 5, 60, "routing to start")
                fault_start = time.monotonic()
                await proxy.cut()
                routed_at_cut = len(collector.counts)
                await asyncio.sleep(outage)
                routed_during = len(collector.counts) - routed_at_cut
                await proxy.start()
                fault_end = time.monotonic()
                await wait_until(lambda: offered <= collector.counts.keys(), 90, "every message")
                stop_asking.set()
                await asking
                dead, _ = await bus.queue_depth(DEAD_QUEUE)
                daemon.kill(signal.SIGTERM)
            finally:
                stop_asking.set()
                if daemon.proc is not None and daemon.proc.poll() is None:
                    daemon.kill(signal.SIGKILL)
                await collector.close()
                await bus.close()
    finally:
        await proxy.close()
        await drop_pg_database(name)
    return counters(
        "db_proxy",
        offered,
        collector,
        fault_start=fault_start,
        fault_end=fault_end,
        extra={
            "outage_s": outage,
            "routed_during_outage": routed_during,
            "dead_lettered": dead,
            "pbx_calls_routed": collector.ignored,
            "route_api_answers": dict(statuses),
            "ok": dead == 0 and not any(s.startswith("5") and s != "503" for s in statuses),
            "tracebacks": daemon.tracebacks(),
        },
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--outage", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="omniroute-fault-") as tmp:
        result = asyncio.run(asyncio.wait_for(scenario(args.messages, args.outage, Path(tmp)), 170))
    return report(result)


if __name__ == "__main__":
    sys.exit(main())
