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

import asyncio
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.faults.common import pg_directory  # noqa: E402
from bench.faults.harness import Result, options, run, set_up  # noqa: E402
from bench.faults.proxy import FaultProxy  # noqa: E402
from ingest.topology import DEAD_QUEUE  # noqa: E402

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


async def scenario(n: int, outage: float, workdir: Path) -> Result:
    async with pg_directory() as direct:
        pg = urlsplit(direct)
        async with (
            FaultProxy(pg.hostname or "127.0.0.1", pg.port or 5432) as proxy,
            set_up(
                "db_proxy",
                workdir,
                messages=n,
                database_url=direct.replace(pg.netloc, f"{pg.username}@127.0.0.1:{proxy.port}"),
                toml=f'[api]\ntoken = "{TOKEN}"\ndefault_dial = "+902125550199"\n'
                "decide_timeout = 1.0\n[directory]\nstatement_timeout = 2.0",
                ignore=lambda m: m.channel == "voice",  # the PBX's calls
            ) as stage,
        ):
            statuses: Counter[str] = Counter()
            stop_asking = asyncio.Event()
            try:
                stage.daemon.start("router", "webhooks")
                await stage.daemon.wait_http()
                asking = asyncio.create_task(
                    ask_routes(stage.daemon.http_port, stop_asking, statuses)
                )
                await stage.wait_routed(n // 5, "routing to start")
                fault_start = time.monotonic()
                await proxy.cut()
                routed_at_cut = stage.routed
                await asyncio.sleep(outage)
                routed_during = stage.routed - routed_at_cut
                await proxy.start()
                fault_end = time.monotonic()
                await stage.wait_all_routed()
                stop_asking.set()
                await asking
                dead, _ = await stage.bus.queue_depth(DEAD_QUEUE)
                stage.daemon.kill(signal.SIGTERM)
            finally:
                stop_asking.set()
    return stage.counters(
        fault_start,
        fault_end,
        outage_s=outage,
        routed_during_outage=routed_during,
        dead_lettered=dead,
        pbx_calls_routed=stage.collector.ignored,
        route_api_answers=dict(statuses),
        ok=dead == 0 and not any(s.startswith("5") and s != "503" for s in statuses),
    )


def main() -> int:
    args = options(__doc__, messages=3000, outage=10.0)
    return run(lambda workdir: scenario(args.messages, args.outage, workdir), 170)


if __name__ == "__main__":
    sys.exit(main())
