"""Shared parts of the fault scenarios: a fresh vhost and directory, the daemon as a process,
a TCP proxy that cuts and stalls, a collector of ``omniroute.routed``, and the Jepsen-queue
counters. Everything listens on loopback; every wait is bounded.

Counters (as a Jepsen queue test reports them):
  offered     messages omniroute accepted (published to the broker, or answered 200)
  routed      distinct offered messages that reached ``omniroute.routed``
  lost        offered but never routed (must be 0)
  duplicated  extra copies on ``omniroute.routed`` (at-least-once; consumers deduplicate)
  recovered   offered messages not yet routed when the fault began, routed after it
  unexpected  routed messages nobody offered
  recover_s   from the end of the fault (restart, reconnect, heal) to the first routed
              message after it

``harness`` puts these parts together the same way for every scenario.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ingest.bus import Bus  # noqa: E402 -- after the path fix above
from ingest.schema import Identity, InboundMessage, RoutedMessage  # noqa: E402
from ingest.settings import BusSettings  # noqa: E402
from ingest.topology import ROUTED_QUEUE  # noqa: E402 -- after the path fix above

AMQP_HOST = os.environ.get("OMNIROUTE_TEST_AMQP_HOST", "127.0.0.1:5672")
PG_DSN = os.environ.get("OMNIROUTE_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
RESULTS = ROOT / "bench" / "faults" / "results"
EXAMPLES = ROOT / "config" / "examples"
REGION = "TR"
#: known customers (by phone and email), an agent, and strangers: every routing reason
SENDERS = [
    ("phone", "0532 111 22 33"),
    ("email", "Fatma.Arslan@Example.com"),
    ("phone", "+90 216 555 02 34"),
    ("email", "stranger@nowhere.example"),
    ("phone", "+1 415 555 0199"),
]


def rabbitmqctl(*args: str, timeout: float = 60) -> None:
    ctl = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    subprocess.run([ctl, "-q", *args], check=True, capture_output=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class Vhost:
    """A vhost of the scenario's own, deleted afterwards."""

    def __init__(self, prefix: str) -> None:
        self.name = f"omniroute-fault-{prefix}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "Vhost":
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        return self

    def __exit__(self, *_: object) -> None:
        try:
            rabbitmqctl("delete_vhost", self.name)
        except subprocess.CalledProcessError as exc:
            print(f"warning: could not delete vhost {self.name}: {exc}", file=sys.stderr)

    def url(self, host: str = AMQP_HOST) -> str:
        return f"amqp://guest:guest@{host}/{self.name}"


async def seed_directory(url: str) -> None:
    """Migrate and load the example directory through the real importer."""
    from routers.csv.importer import import_csv
    from routers.store.engine import create_engine, migrate

    await migrate(url)
    engine = create_engine(url)
    try:
        for kind in ("teams", "agents", "customers", "holidays"):
            path = EXAMPLES / f"{kind}.csv"
            await import_csv(engine, path, kind=kind, region=REGION, dry_run=False)
    finally:
        await engine.dispose()


async def sqlite_directory(workdir: Path) -> str:
    """A fresh SQLite copy of the example directory in ``workdir``; returns its URL."""
    url = f"sqlite:///{workdir}/directory.db"
    await seed_directory(url)
    return url


@contextlib.asynccontextmanager
async def pg_directory() -> AsyncIterator[str]:
    """A fresh database of its own on the local PostgreSQL holding the example directory,
    dropped afterwards (the server itself is shared: it is never restarted)."""
    import asyncpg

    name = f"omniroute_fault_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(f"{PG_DSN}/postgres")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = f"{PG_DSN}/{name}"
    try:
        await seed_directory(url)
        yield url
    finally:
        conn = await asyncpg.connect(f"{PG_DSN}/postgres")
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


def inbound_messages(n: int, prefix: str) -> list[InboundMessage]:
    out = []
    for i in range(n):
        kind, address = SENDERS[i % len(SENDERS)]
        out.append(
            InboundMessage(
                channel="sms" if kind == "phone" else "email",
                external_id=f"{prefix}-{i}",
                sender=Identity(kind=kind, address=address),  # type: ignore[arg-type]
                text="x" * 300,
            )
        )
    return out


async def publish_all(bus: Bus, messages: Iterable[InboundMessage]) -> int:
    from ingest.topology import INBOUND

    n = 0
    for m in messages:
        await bus.publish(INBOUND, m.channel, m, message_id=m.id)
        n += 1
    return n


def open_bus(url: str) -> Bus:
    return Bus(url, BusSettings(publish_timeout=10.0), name="fault-driver")


@dataclass
class Daemon:
    """``python -m config.cli --config FILE run`` as a process, logging JSON to a file."""

    workdir: Path
    amqp_url: str
    database_url: str
    toml: str = ""
    http_port: int = field(default_factory=free_port)
    proc: "subprocess.Popen[bytes] | None" = None

    @property
    def config(self) -> Path:
        return self.workdir / "omniroute.toml"

    @property
    def log(self) -> Path:
        return self.workdir / "daemon.log"

    def write(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lines = [
            f'amqp_url = "{self.amqp_url}"',
            f'database_url = "{self.database_url}"',
            f'state_dir = "{self.workdir / "state"}"',
            "shutdown_timeout = 20",
            self.toml.strip(),
            "[routing]",
            f'default_region = "{REGION}"',
            "[http]",
            'host = "127.0.0.1"',
            f"port = {self.http_port}",
            'public_url = "https://omniroute.example.test"',
            "[log]",
            'format = "json"',
            'level = "info"',
        ]
        self.config.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def start(self, *components: str) -> None:
        self.write()
        args = [sys.executable, "-m", "config.cli", "--config", str(self.config), "run"]
        for component in components:
            args += ["--component", component]
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
        env["PYTHONPATH"] = str(ROOT)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines whose event is ``name``."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{name}"' in line:
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    async def wait_http(self, timeout: float = 30) -> None:
        """Until ``/healthz`` answers 200 (bounded)."""
        import httpx

        url = f"http://127.0.0.1:{self.http_port}/healthz"

        async def up() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    r = await client.get(url, timeout=1)
                    return r.status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(up, timeout, "the daemon's HTTP port")


async def wait_until(check: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll a condition (bounded): these scenarios watch another process, no event exists."""
    try:
        async with asyncio.timeout(timeout):
            while not await _value(check()):
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise SystemExit(f"timed out after {timeout}s waiting for {what}") from None


async def _value(x: Any) -> Any:
    return await x if asyncio.iscoroutine(x) else x


class Collector:
    """Consumes ``omniroute.routed`` on a robust connection of its own and remembers, per
    message key (``key`` of the routed inbound message), how often and when it arrived;
    messages ``ignore`` selects are only counted. A redelivery to the collector itself (its
    ack lost with the connection) is not a duplicate of omniroute's."""

    def __init__(
        self,
        url: str,
        key: Callable[[InboundMessage], str],
        ignore: Callable[[InboundMessage], bool] = lambda _: False,
    ) -> None:
        self._url = url
        self._key = key
        self._ignore = ignore
        self.ignored = 0
        self.counts: dict[str, int] = {}
        self.first_seen: dict[str, float] = {}
        self._conn: Any = None

    async def start(self) -> None:
        self._conn = await aio_pika.connect_robust(self._url + "?heartbeat=5")
        channel = await self._conn.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.get_queue(ROUTED_QUEUE)
        await queue.consume(self._on)

    async def _on(self, message: AbstractIncomingMessage) -> None:
        inbound = RoutedMessage.model_validate_json(message.body).message
        key = self._key(inbound)
        if self._ignore(inbound):
            self.ignored += 1
        elif key in self.counts and message.redelivered:
            pass  # our own ack was lost: the broker gave it to us again
        else:
            self.counts[key] = self.counts.get(key, 0) + 1
            self.first_seen.setdefault(key, time.monotonic())
        with contextlib.suppress(Exception):  # a lost ack is a redelivery, handled above
            await message.ack()

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()

    def routed_after(self, t: float) -> float | None:
        later = [s for s in self.first_seen.values() if s >= t]
        return min(later) if later else None


def counters(
    name: str,
    offered: set[str],
    collector: Collector,
    *,
    fault_start: float,
    fault_end: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    seen = collector.counts
    routed = offered & seen.keys()
    before = {k for k in routed if collector.first_seen[k] < fault_start}
    first_after = collector.routed_after(fault_end)
    result: dict[str, Any] = {
        "scenario": name,
        "offered": len(offered),
        "routed": len(routed),
        "lost": len(offered - seen.keys()),
        "duplicated": sum(c - 1 for c in seen.values()),
        "recovered": len(routed - before),
        "unexpected": len(seen.keys() - offered),
        "recover_s": None if first_after is None else round(first_after - fault_end, 2),
        "fault_s": round(fault_end - fault_start, 2),
        **(extra or {}),
    }
    return result


def report(result: dict[str, Any]) -> int:
    """Print the counters (one human line, one JSON line), save them; exit 1 if a message
    was lost or unexpected, the scenario's own check failed, or the daemon logged a
    traceback (an expected outage is one log line, issue 19)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{result['scenario']}.json").write_text(json.dumps(result, indent=2) + "\n")
    keys = ("offered", "routed", "lost", "duplicated", "recovered", "unexpected", "recover_s")
    print(f"{result['scenario']}: " + " ".join(f"{k}={result[k]}" for k in keys))
    print(json.dumps(result))
    ok = result["lost"] == 0 and result["unexpected"] == 0 and result.get("ok", True)
    ok = ok and result.get("tracebacks", 0) == 0
    return 0 if ok else 1
