#!/usr/bin/env python3
"""The directory at scale on PostgreSQL (issue 18): import time and peak RSS, ``/v1/route``
p50/p99 at 300 requests/s, and router
throughput, for each size asked, then the largest size's figures as multiples of the
smallest's (the issue's goal: p99 and throughput within 1.25x, RSS at most 300 MB).

For each size: the synthetic directory of ``bench/gen_directory.py`` (cached under
benchlib.CACHE), a fresh PostgreSQL database, ``omniroute directory migrate`` and the three
imports exactly as an operator runs them (the customers' under ``/usr/bin/time -v``), every
fifth customer given a last agent an hour ago in one statement (as ``benchlib.import_into``
does row by row), then ``bench/route_latency.py --database-url …`` (the cache-less
target: every request reads the directory) and ``bench/throughput.py
--database-url …``. The database is dropped afterwards unless ``--keep``.

    .venv/bin/python bench/directory_scale.py --sizes 100000,10000000 --keep
    .venv/bin/python bench/directory_scale.py --sizes 100000,10000000 --reuse  # measure again

Needs PostgreSQL (``--pg``, trust auth), RabbitMQ with ``rabbitmqctl``, GNU time, ``hey``; a
10,000,000-customer directory takes about 1 GB of CSV and a few GB of database. Benchmarks
are never tests: this prints, it asserts nothing.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

import benchlib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


def sh(*cmd: str, timeout: float = 7200) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)  # noqa: S603
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])}…: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done


def psql(pg: str, sql: str, db: str = "postgres") -> None:
    sh("psql", f"{pg}/{db}", "-qc", sql)


def seed_last_agents(pg: str, db: str) -> None:
    """Every fifth customer answered by an agent an hour ago, in one statement (through
    psql: at ten million customers it runs longer than the engine's statement timeout)."""
    agents = benchlib.TEAMS * benchlib.AGENTS_PER_TEAM
    psql(pg, "INSERT INTO last_agent (customer_id, agent_id, channel, at) "  # noqa: S608 -- benchlib's ints
         f"SELECT id, 'agent-' || lpad((substr(id, 2)::bigint % {agents})::text, 4, '0'), "
         "'email', now() - interval '1 hour' FROM customers "
         f"WHERE substr(id, 2)::bigint % {benchlib.LAST_AGENT_EVERY} = 0 "
         "ON CONFLICT DO NOTHING", db)


def one_size(customers: int, pg: str, a: argparse.Namespace) -> dict[str, float]:
    folder = benchlib.CACHE / f"csv-{customers}"
    if not (folder / "customers.csv").exists():
        t0 = time.perf_counter()
        building = folder.with_name(folder.name + ".building")  # never a half file as cached
        benchlib.write_directory(building, customers)
        building.rename(folder)
        print(f"{customers}: CSV written in {time.perf_counter() - t0:.0f} s", flush=True)
    db = f"omniroute_scale_{customers}"
    url = f"{pg}/{db}"
    seconds, rss = float("nan"), float("nan")
    if not a.reuse:
        psql(pg, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        psql(pg, f'CREATE DATABASE "{db}"')
    config = benchlib.CACHE / f"scale-{customers}.toml"
    config.write_text(f'database_url = "{url}"\n[routing]\ndefault_region = "{benchlib.REGION}"\n')
    cli = [PY, "-m", "config.cli", "--config", str(config)]
    try:
        if not a.reuse:
            sh(*cli, "directory", "migrate")
            for kind in ("teams", "agents"):
                sh(*cli, "directory", "import", str(folder / f"{kind}.csv"))
            t0 = time.perf_counter()
            timed = sh("/usr/bin/time", "-v", *cli, "directory", "import",
                       str(folder / "customers.csv"))
            seconds = time.perf_counter() - t0
            kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", timed.stderr)
            assert kib is not None, timed.stderr
            rss = int(kib[1]) / 1024
            print(f"{customers}: import {seconds:.1f} s, peak RSS {rss:.0f} MiB; "
                  f"{timed.stdout.strip().splitlines()[-1]}", flush=True)
        seed_last_agents(pg, db)
        psql(pg, "VACUUM ANALYZE", db)
        latency = sh(PY, str(HERE / "route_latency.py"), "--customers", str(customers),
                     "--database-url", url, "--targets", "omniroute-nocache",
                     "--rates", "300", "--duration", str(a.duration),
                     "--rounds", str(a.rounds)).stdout
        print(latency.split("summary:")[1].strip(), flush=True)
        p = re.search(r"omniroute-nocache\s+p50 ([\d.]+) ms .*p99 ([\d.]+) ms", latency)
        assert p is not None, latency
        daemon = re.search(r"omniroute-nocache peak RSS ([\d.]+) MiB", latency)
        assert daemon is not None, latency
        through = sh(PY, str(HERE / "throughput.py"), "--customers", str(customers),
                     "--database-url", url, "-n", str(a.messages),
                     "--rounds", str(a.rounds)).stdout
        r = re.search(r"router x1: median (\d+) msg/s", through)
        q = re.search(r"ratio router/forwarder .*?: median ([\d.]+) \(min ([\d.]+), max ([\d.]+)\)",
                      through)
        assert r is not None, through
        assert q is not None, through
        print(f"{customers}: router median {r[1]} msg/s, ratio to the forwarder {q[1]} "
              f"(min {q[2]}, max {q[3]})", flush=True)
        return {"import_s": seconds, "rss_mib": rss, "daemon_mib": float(daemon[1]),
                "p50": float(p[1]),
                "p99": float(p[2]), "router": float(r[1]), "ratio": float(q[1])}
    finally:
        if not (a.keep or a.reuse):
            psql(pg, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main(a: argparse.Namespace) -> None:
    print(benchlib.machine(), flush=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    found = {size: one_size(size, a.pg, a) for size in sizes}
    print("\ncustomers   import s  import RSS MiB  daemon RSS MiB  p50 ms  p99 ms  "
          "router msg/s  router/forwarder")
    for size, f in found.items():
        print(f"{size:>10}  {f['import_s']:8.1f}  {f['rss_mib']:14.0f}  {f['daemon_mib']:14.0f}  "
              f"{f['p50']:6.2f}  {f['p99']:6.2f}  {f['router']:12.0f}  {f['ratio']:16.2f}")
    if len(sizes) > 1:
        small, large = found[min(sizes)], found[max(sizes)]
        print(f"\n{max(sizes)} vs {min(sizes)}: p99 x{large['p99'] / small['p99']:.2f}, "
              f"router throughput x{small['router'] / large['router']:.2f} slower, "
              f"ratio to the forwarder {large['ratio']:.2f} vs {small['ratio']:.2f} "
              "(goal: within 1.25x; RSS at most 300 MB)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,10000000")
    p.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--keep", action="store_true", help="keep the databases")
    p.add_argument("--reuse", action="store_true",
                   help="measure the databases a --keep run left (no import; implies --keep)")
    main(p.parse_args())
