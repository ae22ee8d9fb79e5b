#!/usr/bin/env python3
"""End-to-end latency: from a Twilio SMS webhook's 200 to the routed message on the queue.

Starts, on loopback, the omniroute daemon with the ``webhooks`` and ``router`` components
(SQLite directory of ``--customers`` customers, a fresh RabbitMQ vhost, Twilio's auth token
set so signatures are checked), and a consumer on ``omniroute.routed`` in this process.
Then posts signed SMS webhooks at a steady rate (one every 1/rate seconds, each its own
MessageSid; 70 % from phone numbers in the directory, 30 % from strangers) and, for each
message, takes the time its 200 arrived and the time its ``RoutedMessage`` arrived. It
prints p50/p99/max of "200 -> routed" and of "sent -> routed" per rate, and every non-200.

A negative "200 -> routed" is a message routed before its 200 reached the client (the
webhook answers after the broker confirmed the publish, and the router can be faster than
the HTTP response).

Usage: webhook_latency.py [--customers 100000] [--rates 50,200] [--duration 20] [--rounds 3]
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import benchlib

ROOT = Path(__file__).resolve().parent.parent
AUTH_TOKEN = "bench-auth-" + uuid.uuid4().hex[:8]
ACCOUNT = "AC" + "0" * 32
PATH = "/webhooks/twilio/sms"


def known_phones(db: Path, n: int) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "select address from identities where kind = 'phone' order by random() limit ?", (n,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def start_daemon(work: Path, amqp_url: str, db: Path, port: int) -> subprocess.Popen[bytes]:
    config = work / "omniroute.toml"
    config.write_text("\n".join([
        f'amqp_url = "{amqp_url}"', f'database_url = "sqlite:///{db}"',
        f'state_dir = "{work / "state"}"',
        "[http]", 'host = "127.0.0.1"', f"port = {port}",
        f'public_url = "http://127.0.0.1:{port}"',
        "[twilio]", f'account_sid = "{ACCOUNT}"', f'auth_token = "{AUTH_TOKEN}"',
        'from_number = "+902125550000"',
        "[routing]", f'default_region = "{benchlib.REGION}"', 'default_team = "team-00"',
    ]) + "\n")
    log = (work / "daemon.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "config.cli", "--config", str(config), "run",
                             "--component", "webhooks", "--component", "router"],
                            cwd=ROOT, stdout=log, stderr=log)


async def wait_ready(port: int, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            try:
                r = await client.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the daemon did not become ready")
            await asyncio.sleep(0.2)


async def one_rate(port: int, amqp_url: str, rate: int, duration: float,
                   callers: list[str]) -> dict[str, object]:
    import aio_pika
    import httpx
    from twilio.request_validator import RequestValidator

    validator = RequestValidator(AUTH_TOKEN)
    url = f"http://127.0.0.1:{port}{PATH}"
    sent: dict[str, float] = {}
    ok: dict[str, float] = {}
    routed: dict[str, float] = {}
    codes: dict[int, int] = {}
    run = uuid.uuid4().hex[:6]

    conn = await aio_pika.connect(amqp_url)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=500)
    queue = await channel.get_queue("omniroute.routed")

    async def on_routed(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        now = time.perf_counter()
        external = json.loads(message.body)["message"]["external_id"]
        routed.setdefault(external, now)
        await message.ack()

    tag = await queue.consume(on_routed)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    # TCP_NODELAY on the client too (httpx writes a request's headers and body separately);
    # the ~40 ms every 200 used to take was the daemon's side, fixed in b806f62
    transport = httpx.AsyncHTTPTransport(
        limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )
    async with httpx.AsyncClient(transport=transport, timeout=30) as client:

        async def post(i: int) -> None:
            sid = f"SM{run}{i:026d}"
            params = {"MessageSid": sid, "AccountSid": ACCOUNT, "To": "+902125550000",
                      "From": random.choice(callers), "Body": "Modemim calismiyor",  # noqa: S311
                      "NumMedia": "0"}
            headers = {"X-Twilio-Signature": validator.compute_signature(url, params)}
            sent[sid] = time.perf_counter()
            response = await client.post(url, data=params, headers=headers)
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            if response.status_code == 200:
                ok[sid] = time.perf_counter()

        t0 = time.perf_counter()
        tasks = []
        for i in range(int(rate * duration)):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(i)))
        await asyncio.gather(*tasks)
    deadline = time.perf_counter() + 60
    while set(ok) - set(routed) and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    await queue.cancel(tag)
    await conn.close()
    after_ok = sorted((routed[s] - ok[s]) * 1000 for s in ok if s in routed)
    after_sent = sorted((routed[s] - sent[s]) * 1000 for s in ok if s in routed)
    answered = sorted((ok[s] - sent[s]) * 1000 for s in ok)
    return {"rate": rate, "offered": len(sent), "ok": len(ok), "routed": len(after_ok),
            "codes": codes, "ok_p50": pct(after_ok, 50), "ok_p99": pct(after_ok, 99),
            "ok_max": after_ok[-1] if after_ok else float("nan"),
            "sent_p50": pct(after_sent, 50), "sent_p99": pct(after_sent, 99),
            "early": sum(1 for v in after_ok if v < 0),
            "http_p50": pct(answered, 50), "http_p99": pct(answered, 99)}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def main(a: argparse.Namespace) -> None:
    print(benchlib.machine())
    template = benchlib.directory_db(a.customers)
    rates = [int(r) for r in a.rates.split(",")]
    known = known_phones(template, 5000)
    callers = known * 7 + [f"+1555{i:07d}" for i in range(len(known) * 3)]
    results: dict[int, list[dict[str, object]]] = {}
    for rnd in range(a.rounds):
        work = benchlib.CACHE / f"webhook-{uuid.uuid4().hex[:6]}"
        work.mkdir(parents=True)
        db = work / "directory.sqlite"
        shutil.copyfile(template, db)
        port = benchlib.free_port()
        try:
            with benchlib.fresh_vhost("omniroute-webhook") as amqp_url:
                proc = start_daemon(work, amqp_url, db, port)
                try:
                    await wait_ready(port)
                    for rate in rates:
                        res = await one_rate(port, amqp_url, rate, a.duration, callers)
                        results.setdefault(rate, []).append(res)
                        print(f"round {rnd + 1} {rate:4}/s: 200->routed p50 {res['ok_p50']:.1f} ms "
                              f"p99 {res['ok_p99']:.1f} ms max {res['ok_max']:.1f} ms; "
                              f"sent->routed p50 {res['sent_p50']:.1f} ms p99 "
                              f"{res['sent_p99']:.1f} ms; sent->200 p50 {res['http_p50']:.1f} ms "
                              f"p99 {res['http_p99']:.1f} ms; offered {res['offered']}, 200 "
                              f"{res['ok']}, routed {res['routed']}, routed before its 200 "
                              f"{res['early']}, codes {res['codes']}", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("\nsummary: median over rounds (min-max)")
    for rate, runs in results.items():
        for key, label in (("ok_p50", "200->routed p50"), ("ok_p99", "200->routed p99"),
                           ("sent_p50", "sent->routed p50"), ("sent_p99", "sent->routed p99"),
                           ("http_p50", "sent->200 p50"), ("http_p99", "sent->200 p99")):
            med, lo, hi = benchlib.median_spread([float(str(r[key])) for r in runs])
            print(f"{rate:5}/s {label:18} {med:7.1f} ms ({lo:.1f}-{hi:.1f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=100_000)
    p.add_argument("--rates", default="50,200")
    p.add_argument("--duration", type=float, default=20)
    p.add_argument("--rounds", type=int, default=3)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(p.parse_args()))
