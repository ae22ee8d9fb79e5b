#!/usr/bin/env python3
"""Caller-ID latency: ``/v1/route`` of the real daemon against the floor of its HTTP stack.

Starts, on loopback, (1) the omniroute daemon with only the ``webhooks`` component (FastAPI
on uvicorn in the daemon's event loop, the SQLite directory with ``--customers`` customers,
a fresh RabbitMQ vhost for the voice messages it publishes after answering), and (2) the
floor: a bare FastAPI app on the same uvicorn configuration, one process, whose
``/v1/route`` does one dict lookup. Then drives each at fixed rates with ``hey`` (constant
rate: ``-q`` per worker times ``-c`` workers) and prints p50/p99 and every non-200.

``hey`` sends one URL, so one caller number: with the directory cache on (the default
``router.directory_cache_ttl``) every request after the first is a cache hit; the
``omniroute-nocache`` target runs with ``directory_cache_ttl = 0`` so every request reads
the directory.

``--database-url`` points the omniroute targets at an imported directory (PostgreSQL, issue
18's ten million customers) instead of a copy of the SQLite one. (An open-loop load over
many callers written in Python was tried and dropped: at 300/s on two cores its own lag,
not the daemon, set the latency. On this machine the whole index of a large directory sits
in the page cache, so one caller's lookup costs what any caller's does.)

Usage: route_latency.py [--customers 100000] [--rates 100,300,1000] [--duration 20]
       [--rounds 3] [--targets floor,omniroute,omniroute-nocache]
       [--database-url postgresql://...]
"""

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import benchlib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TOKEN = "bench-token-" + uuid.uuid4().hex[:8]
#: hey workers per rate; -q is per worker
WORKERS = {100: 10, 300: 30, 1000: 50}


def floor_app() -> None:
    """The floor: same server stack, one dict lookup, JSON out."""
    import uvicorn
    from fastapi import FastAPI, Query
    from fastapi.responses import JSONResponse

    table = {f"+90530{i:07d}": {"kind": "team", "target": f"team-{i % 20:02d}"}
             for i in range(100_000)}
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.get("/v1/route")
    async def route(caller: str = Query(...)) -> JSONResponse:
        return JSONResponse({"route": table.get(caller), "dial": "queue:team-00"})

    uvicorn.run(app, host="127.0.0.1", port=int(os.environ["FLOOR_PORT"]), lifespan="off",
                log_config=None, access_log=False, server_header=False)


def wait_http(url: str, headers: dict[str, str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2):  # noqa: S310
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def start_daemon(work: Path, amqp_url: str, db_url: str, port: int, ttl: float | None
                 ) -> subprocess.Popen[bytes]:
    config = work / f"omniroute-{port}.toml"
    lines = [
        f'amqp_url = "{amqp_url}"', f'database_url = "{db_url}"',
        f'state_dir = "{work / f"state-{port}"}"', 'components = ["webhooks"]',
        "[http]", 'host = "127.0.0.1"', f"port = {port}",
        "[api]", f'token = "{TOKEN}"',
        "[routing]", f'default_region = "{benchlib.REGION}"',
    ]
    if ttl is not None:
        lines += ["[router]", f"directory_cache_ttl = {ttl}"]
    config.write_text("\n".join(lines) + "\n")
    log = (work / f"daemon-{port}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "config.cli", "--config", str(config), "run",
                             "--component", "webhooks"], cwd=ROOT, stdout=log, stderr=log)


def hey(url: str, rate: int, duration: int, headers: dict[str, str]) -> dict[str, float | str]:
    workers = WORKERS.get(rate, max(1, rate // 20))
    cmd = ["hey", "-q", str(rate // workers), "-c", str(workers), "-z", f"{duration}s"]
    for key, value in headers.items():
        cmd += ["-H", f"{key}: {value}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=duration + 60).stdout
    pct = {int(m[1]): float(m[2]) * 1000 for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", out)}
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    errors = re.search(r"Error distribution:(.*)", out, re.S)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {"p50": pct.get(50, float("nan")), "p99": pct.get(99, float("nan")),
            "rps": float(rps[1]) if rps else float("nan"),
            "codes": json.dumps(codes), "errors": errors[1].strip()[:300] if errors else ""}


def main(a: argparse.Namespace) -> None:
    print(benchlib.machine())
    template = None if a.database_url else benchlib.directory_db(a.customers)
    work = benchlib.CACHE / f"latency-{uuid.uuid4().hex[:6]}"
    work.mkdir(parents=True)
    rates = [int(r) for r in a.rates.split(",")]
    targets = a.targets.split(",")
    caller = asyncio.run(known_caller(a.database_url or f"sqlite:///{template}"))
    procs: list[subprocess.Popen[bytes]] = []
    results: dict[tuple[str, int], list[dict[str, float | str]]] = {}
    try:
        with benchlib.fresh_vhost("omniroute-latency") as amqp_url:
            urls: dict[str, tuple[str, dict[str, str]]] = {}
            pids: dict[str, int] = {}
            for target in targets:
                port = benchlib.free_port()
                if target == "floor":
                    env = {**os.environ, "FLOOR_PORT": str(port)}
                    procs.append(subprocess.Popen([sys.executable, __file__, "--floor"], env=env))
                    pids[target] = procs[-1].pid
                    urls[target] = (f"http://127.0.0.1:{port}/v1/route?caller=%2B905300000001", {})
                else:
                    if a.database_url:
                        db_url = a.database_url
                    else:
                        assert template is not None
                        db = work / f"{target}.sqlite"
                        shutil.copyfile(template, db)
                        db_url = f"sqlite:///{db}"
                    if a.calendars:
                        asyncio.run(benchlib.calendars_on(db_url))
                    ttl = 0.0 if target.endswith("nocache") else None
                    procs.append(start_daemon(work, amqp_url, db_url, port, ttl))
                    pids[target] = procs[-1].pid
                    urls[target] = (f"http://127.0.0.1:{port}/v1/route?caller={caller}&format=json",
                                    {"Authorization": f"Bearer {TOKEN}"})
            for target, (url, headers) in urls.items():
                wait_http(url, headers)
                with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:  # noqa: S310
                    print(f"{target}: {url.split('?')[0]} -> {r.read()[:200].decode()}")
            for rnd in range(a.rounds):
                for rate in rates:
                    for target, (url, headers) in urls.items():
                        before = decision_totals(url, headers) if target != "floor" else None
                        cpu = cpu_seconds(pids[target])
                        res = hey(url, rate, a.duration, headers)
                        served = sum(int(n) for n in json.loads(str(res["codes"])).values())
                        res["cpu_ms"] = 1000 * (cpu_seconds(pids[target]) - cpu) / max(served, 1)
                        if before is not None:
                            after = decision_totals(url, headers)
                            count = after[1] - before[1]
                            res["decide_ms"] = 1000 * (after[0] - before[0]) / count if count else 0
                        results.setdefault((target, rate), []).append(res)
                        errors = f", errors {res['errors']}" if res["errors"] else ""
                        decide = (f" mean decision {float(res['decide_ms']):.2f} ms"
                                  if "decide_ms" in res else "")
                        print(f"round {rnd + 1} {target:18} {rate:5}/s: p50 {res['p50']:.2f} ms "
                              f"p99 {res['p99']:.2f} ms  ({res['rps']:.0f} req/s, codes "
                              f"{res['codes']}{errors}){decide}, CPU {res['cpu_ms']:.2f} ms"
                              " per request", flush=True)
        peaks = {target: peak_rss_mib(pid) for target, pid in pids.items()}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)
    print("\nsummary: median over rounds (min-max)")
    for rate in rates:
        floor99 = None
        for target in targets:
            runs = results[(target, rate)]
            p50 = benchlib.median_spread([float(r["p50"]) for r in runs])
            p99 = benchlib.median_spread([float(r["p99"]) for r in runs])
            if target == "floor":
                floor99 = p99[0]
            cpu = benchlib.median_spread([float(r["cpu_ms"]) for r in runs])
            ratio = f"  p99/floor {p99[0] / floor99:.2f}" if floor99 and target != "floor" else ""
            print(f"{rate:5}/s {target:18} p50 {p50[0]:.2f} ms ({p50[1]:.2f}-{p50[2]:.2f})  "
                  f"p99 {p99[0]:.2f} ms ({p99[1]:.2f}-{p99[2]:.2f})  "
                  f"CPU {cpu[0]:.2f} ms/request{ratio}")
    for target in targets:
        print(f"{target} peak RSS {peaks[target]:.0f} MiB")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def decision_totals(url: str, headers: dict[str, str]) -> tuple[float, float]:
    """(sum, count) of the daemon's decision_seconds histogram, from its /metrics."""
    base = url.split("/v1/")[0]
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("omniroute_decision_seconds_sum"):
            total = float(line.split()[-1])
        elif line.startswith("omniroute_decision_seconds_count"):
            count = float(line.split()[-1])
    return total, count


async def known_caller(db_url: str) -> str:
    """Customer c00000001's phone number (E.164, URL-encoded)."""
    from sqlalchemy import select

    from routers.models import CustomerIdentity
    from routers.store.engine import create_engine

    engine = create_engine(db_url)
    ident = CustomerIdentity.__table__.c
    try:
        async with engine.connect() as conn:
            address = await conn.scalar(select(ident.address).where(
                ident.kind == "phone", ident.customer_id == "c00000001").limit(1))
    finally:
        await engine.dispose()
    if address is None:
        raise SystemExit("the directory has no phone for customer c00000001")
    return str(address).replace("+", "%2B")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--rates", default="100,300,1000")
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--targets", default="floor,omniroute,omniroute-nocache")
    p.add_argument("--calendars", action="store_true",
                   help="issue 15: hours, holidays and after-hours teams for every team, a "
                   "capacity for every agent (benchlib.calendars_on)")
    p.add_argument("--database-url", default=None,
                   help="an imported directory for the omniroute targets (default: SQLite)")
    p.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor:
        floor_app()
    else:
        main(args)
