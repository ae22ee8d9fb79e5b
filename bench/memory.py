#!/usr/bin/env python3
"""Resident size of a router process with a large directory, idle and under load.

Starts one router process exactly as ``bench/throughput.py`` does (the real
``RouterWorker``, ``DirectoryDecider`` and ``Bus``, default settings) against a copy of the
SQLite directory with ``--customers`` customers (default 1,000,000) on a fresh vhost. Reads
``VmRSS`` from ``/proc/<pid>/status``: after start-up (idle, nothing consumed), then every
100 ms while it routes N preloaded messages (``--known`` of them from distinct directory
customers, so the directory cache fills), then idle again after the load.

Usage: memory.py [--customers 1000000] [-n 20000] [--rounds 3]
"""

import argparse
import asyncio
import shutil
import subprocess
import sys
import time
import uuid

import aio_pika
import benchlib
from forwarder import limit_sample
from throughput import HERE, make_body, preload


async def one(url: str, db_url: str, n: int, known: float, customers: int) -> dict[str, int]:
    proc = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything is timed)
        [sys.executable, str(HERE / "throughput.py"), "--child", "--url", url,
         "--database-url", db_url, "--prefetch", "256"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        assert proc.stdin is not None
        if (await asyncio.to_thread(proc.stderr.readline)).strip() != b"ready":
            raise SystemExit("router process failed to start")
        await asyncio.sleep(2)
        idle_before = benchlib.rss_kib(proc.pid)
        run = uuid.uuid4().hex[:6]
        size = len(limit_sample(0))
        await preload(url, [make_body(i, known, customers, run, size) for i in range(n)])
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        conn = await aio_pika.connect(url)
        ch = await conn.channel()
        peak = 0
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            peak = max(peak, benchlib.rss_kib(proc.pid))
            q = await ch.declare_queue("omniroute.routed", passive=True)
            if (q.declaration_result.message_count or 0) >= n:
                break
            await asyncio.sleep(0.1)
        after_load = benchlib.rss_kib(proc.pid)
        await asyncio.sleep(2)
        idle_after = benchlib.rss_kib(proc.pid)
        await (await ch.declare_queue("omniroute.routed", passive=True)).purge()
        await conn.close()
        return {"idle_start": idle_before, "peak_load": peak, "end_load": after_load,
                "idle_after": idle_after}
    finally:
        if proc.poll() is None and proc.stdin is not None:
            proc.stdin.write(b"stop\n")
            proc.stdin.flush()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def main(a: argparse.Namespace) -> None:
    print(benchlib.machine())
    template = benchlib.directory_db(a.customers)
    print(f"directory: {a.customers} customers, {template.stat().st_size / 2**20:.0f} MiB SQLite")
    results: list[dict[str, int]] = []
    with benchlib.fresh_vhost("omniroute-memory") as url:
        for r in range(a.rounds):
            copy = benchlib.CACHE / f"memory-{uuid.uuid4().hex[:6]}.sqlite"
            shutil.copyfile(template, copy)
            try:
                res = await one(url, f"sqlite:///{copy}", a.n, a.known, a.customers)
            finally:
                for suffix in ("", "-wal", "-shm"):
                    copy.with_name(copy.name + suffix).unlink(missing_ok=True)
            results.append(res)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in res.items()),
                  flush=True)
    print("summary: median (min-max) VmRSS of the router process")
    for key in results[0]:
        med, lo, hi = benchlib.median_spread([float(r[key]) for r in results])
        print(f"  {key:11} {med / 1024:.1f} MiB ({lo / 1024:.1f}-{hi / 1024:.1f})")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--customers", type=int, default=1_000_000)
    p.add_argument("-n", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--known", type=float, default=0.7)
    asyncio.run(main(p.parse_args()))
