"""Shared set-up for the benchmarks: a cached synthetic directory, a throwaway RabbitMQ vhost,
and the machine description every figure is reported with.

Sole purpose: every benchmark measures against the same directory (``gen_directory.py``
imported with ``routers.csv.importer.import_csv``, region TR) and a vhost of its own that is
deleted at the end, so runs never see each other's queues.
"""

import asyncio
import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gen_directory import AGENTS_PER_TEAM, TEAMS, write_directory  # noqa: E402

CACHE = Path(os.environ.get("OMNIROUTE_BENCH_CACHE", "/tmp/omniroute-bench"))  # noqa: S108
REGION = "TR"
AMQP_HOST = os.environ.get("OMNIROUTE_BENCH_AMQP_HOST", "127.0.0.1:5672")
#: share of known customers that have a last agent (so the sticky path is exercised)
LAST_AGENT_EVERY = 5


def rabbitmqctl(*args: str) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def fresh_vhost(prefix: str = "omniroute-bench") -> Iterator[str]:
    """A vhost of this run's own (guest has all rights), deleted when the block ends."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{AMQP_HOST}/{name}"
    finally:
        rabbitmqctl("delete_vhost", name)


def directory_db(customers: int) -> Path:
    """The SQLite directory with ``customers`` customers, built once and cached under CACHE."""
    db = CACHE / f"directory-{customers}.sqlite"
    if db.exists():
        return db
    folder = CACHE / f"csv-{customers}"
    tmp = db.with_suffix(".building")
    for stale in (tmp, tmp.with_name(tmp.name + "-wal"), tmp.with_name(tmp.name + "-shm")):
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    write_directory(folder, customers)
    # a thread of its own: callers may already run an event loop (throughput.py, memory.py)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, import_into(f"sqlite:///{tmp}", folder, customers)).result()
    tmp.rename(db)
    print(f"directory: {customers} customers imported in {time.perf_counter() - t0:.0f} s -> {db}",
          file=sys.stderr)
    return db


async def import_into(url: str, folder: Path, customers: int) -> None:
    """Migrate ``url`` and import teams, agents and customers from ``folder``."""
    from routers.csv.importer import import_csv
    from routers.store.engine import create_engine, migrate

    await migrate(url)
    engine = create_engine(url)
    try:
        for name in ("teams", "agents", "customers"):
            report = await import_csv(engine, folder / f"{name}.csv", kind=None, region=REGION,
                                      dry_run=False)
            if report.rejected:
                raise SystemExit(f"{name}: {report.rejected} rows rejected")
        await seed_last_agents(engine, customers)
    finally:
        await engine.dispose()


async def seed_last_agents(engine, customers: int) -> None:  # type: ignore[no-untyped-def]
    """Every LAST_AGENT_EVERY-th customer was answered by an agent an hour ago."""
    from routers import state
    from routers.store.engine import sessionmaker

    at = datetime.now(UTC) - timedelta(hours=1)
    agents = TEAMS * AGENTS_PER_TEAM
    async with sessionmaker(engine).begin() as session:
        for i in range(0, customers, LAST_AGENT_EVERY):
            await state.record_reply(session, agent_id=f"agent-{i % agents:04d}",
                                     customer_id=f"c{i:08d}", channel="email", at=at)


async def calendars_on(url: str) -> None:
    """Issue 15's worst case for the router: every team has weekly hours, a time zone, the
    TR holiday calendar, company days and an after-hours team; every agent a capacity on
    every channel. The hours cover the whole week, so the routes stay those of the plain
    directory while every calendar, presence and load is still read and computed."""
    from datetime import date

    from sqlalchemy import insert, select, update

    from routers.models import Agent, CompanyHoliday, Team
    from routers.store.engine import create_engine

    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            teams = list((await connection.execute(select(Team.id).order_by(Team.id))).scalars())
            for i, team in enumerate(teams):
                await connection.execute(
                    update(Team)
                    .where(Team.id == team)
                    .values(
                        timezone="Europe/Istanbul",
                        hours="Mon-Sun 00:00-24:00",
                        holidays="TR",
                        after_hours=teams[(i + 1) % len(teams)],
                        after_hours_dial="sip:voicemail@pbx.example.com",
                    )
                )
                await connection.execute(
                    insert(CompanyHoliday),
                    [
                        {"team_id": team, "day": date(2027, 1, 2), "name": "Inventory"},
                        {"team_id": team, "day": date(2027, 12, 31), "name": "Eve",
                         "hours": "09:00-13:00"},
                    ],
                )
            await connection.execute(
                update(Agent).values(capacity="email=1000;sms=50;whatsapp=50;twitter=100")
            )
    finally:
        await engine.dispose()


def known_email(i: int) -> str:
    """An address ``gen_directory`` gave customer ``i`` (any case: the router normalises)."""
    return f"Customer{i}@Example{i % 97}.com"


def machine() -> str:
    def run(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()  # noqa: S602

    return "\n".join([
        f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"nproc: {run('nproc')}",
        run("lscpu | grep -E '^(Model name|CPU\\(s\\)|Thread|Core)'"),
        run("free -h | head -2"),
        f"uptime: {run('uptime')}",
        f"python: {sys.version.split()[0]}",
        run("rabbitmqctl -q version 2>/dev/null | sed 's/^/rabbitmq: /'"),
    ])


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def median_spread(values: list[float]) -> tuple[float, float, float]:
    s = sorted(values)
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return med, s[0], s[-1]
