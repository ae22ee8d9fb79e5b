"""Hostile mail against the running daemon: how long each attack takes to be routed, the
daemon's peak memory, its parse workers' peak, and the worst ``/healthz`` answer meanwhile.

Sole purpose (issue 13): show, with figures, that no single mail takes omniroute down. The
daemon (``omniroute run`` with email, router and webhooks) runs as a subprocess under
``RLIMIT_AS`` 4 GiB on a fresh RabbitMQ vhost, a SQLite directory and the test Dovecot
(plain IMAP on 127.0.0.1, IDLE). Each attack of ``tests/hostile_mail.py`` is appended by
IMAP APPEND, followed by one good mail; the time from the APPEND to the attack's routed
message on ``omniroute.routed`` is printed, with the reason it was routed unparsed, if
it was. A prober asks ``/healthz`` every 50 ms throughout.

Run twice: with the default pre-checks, and ``--wide-open`` (the pre-checks set so high
that every attack reaches the stdlib parser, whose worker limits must then end it).

Needs Dovecot, RabbitMQ with ``rabbitmqctl``, root (the mail directory is handed to
``nobody``); from the repository root:

    .venv/bin/python bench/hostile.py [--wide-open] [--parse-timeout 5]

Benchmarks are never tests: this prints, it does not assert.
"""

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import fresh_vhost, machine  # noqa: E402

from ingest.bus import Bus  # noqa: E402
from ingest.schema import RoutedMessage  # noqa: E402
from ingest.settings import BusSettings  # noqa: E402
from ingest.topology import ROUTED_QUEUE  # noqa: E402
from tests import hostile_mail  # noqa: E402
from tests.email_fixtures import PASSWORD, USER, Dovecot, free_port  # noqa: E402

DAEMON_AS = 4 * 1024**3
WIDE_OPEN = {
    "max_header_bytes": 4 * 1024 * 1024,
    "max_encoded_words": 10**7,
    "max_mime_depth": 200,
    "max_parts": 10**7,
}


def config(
    root: Path, amqp_url: str, imap_port: int, http_port: int, args: argparse.Namespace
) -> Path:
    email = {"parse_timeout": args.parse_timeout, **(WIDE_OPEN if args.wide_open else {})}
    lines = [
        f'amqp_url = "{amqp_url}"',
        f'database_url = "sqlite:///{root}/directory.db"',
        f'state_dir = "{root / "state"}"',
        "[http]",
        f"port = {http_port}",
        "[log]",
        'format = "json"',
        "[email]",
        *(f"{key} = {value}" for key, value in email.items()),
        "[[email.mailboxes]]",
        'name = "support"',
        'host = "127.0.0.1"',
        f"port = {imap_port}",
        'security = "none"',
        f'username = "{USER}"',
        f'password = "{PASSWORD}"',
        "batch_size = 10",
        "idle_renew = 60",
    ]
    path = root / "omniroute.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def start_daemon(path: Path, log: Path) -> "subprocess.Popen[bytes]":
    """The directory migrated, then ``omniroute run`` under ``DAEMON_AS``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    cli = [sys.executable, "-m", "config.cli", "--config", str(path)]
    subprocess.run(  # noqa: S603
        [*cli, "directory", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    components = ["--component", "email", "--component", "router", "--component", "webhooks"]
    with log.open("ab") as out:
        return subprocess.Popen(  # noqa: S603
            [*cli, "run", *components],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit,  # noqa: PLW1509 -- setrlimit only, before exec
        )


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (DAEMON_AS, DAEMON_AS))


def rss_kib(pid: int, key: str = "VmRSS") -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


class Watch:
    """Worst /healthz answer and the workers' peak RSS, sampled every 50 ms."""

    def __init__(self, port: int, daemon: int) -> None:
        self.port = port
        self.daemon = daemon
        self.worst_health = 0.0
        self.worker_peak = 0
        self.failures = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}", timeout=10
        ) as client:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    if (await client.get("/healthz")).status_code != 200:
                        self.failures += 1
                except httpx.HTTPError:
                    self.failures += 1
                self.worst_health = max(self.worst_health, time.monotonic() - started)
                for child in children(self.daemon):
                    self.worker_peak = max(self.worker_peak, rss_kib(child))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await stop.wait()


async def routed(bus: Bus, tag: str, timeout: float = 120) -> RoutedMessage:
    """The mail whose Message-ID or Subject starts with ``tag``, off omniroute.routed."""
    channel = await bus.connection.channel()
    try:
        queue = await channel.get_queue(ROUTED_QUEUE)
        async with asyncio.timeout(timeout):
            while True:
                got = await queue.get(fail=False)
                if got is None:
                    await asyncio.sleep(0.01)
                    continue
                await got.ack()
                routed = RoutedMessage.model_validate_json(got.body)
                message = routed.message
                ids = (message.thread.message_id if message.thread else None, message.subject)
                if message.channel == "email" and any((i or "").startswith(tag) for i in ids):
                    return routed
    finally:
        await channel.close()


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="omniroute-hostile-"))
    os.chmod(root, 0o755)  # noqa: S103 (dovecot's unprivileged processes read below it)
    server = Dovecot(root=root, port=free_port())
    server.start()
    proc: subprocess.Popen[bytes] | None = None
    try:
        with fresh_vhost("omniroute-hostile") as amqp_url:
            http_port = free_port()
            path = config(root, amqp_url, server.port, http_port, args)
            proc = await asyncio.to_thread(start_daemon, path, root / "daemon.log")
            bus = Bus(amqp_url, BusSettings(), name="bench")
            await bus.open()
            async with asyncio.timeout(30):
                while rss_kib(proc.pid) == 0 or not _listening(http_port):
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1)  # the mailbox worker is in IDLE
            watch = Watch(http_port, proc.pid)
            stop = asyncio.Event()
            watching = asyncio.create_task(watch.run(stop))
            print(f"{'attack':16} {'bytes':>9} {'routed in':>10}  reason")
            try:
                for n, (tag, raw) in enumerate(hostile_mail.attacks()):
                    started = time.monotonic()
                    await asyncio.to_thread(server.append, raw)
                    item = await routed(bus, tag)
                    took = time.monotonic() - started
                    reason = item.message.meta.get("unparsed_reason") or "parsed"
                    print(f"{tag:16} {len(raw):9} {took:9.2f}s  {reason}")
                    await asyncio.to_thread(server.append, hostile_mail.good(f"good-{n}"))
                    await routed(bus, f"good-{n}")
            finally:
                stop.set()
                await watching
                await bus.close()
            print(f"daemon peak RSS (VmHWM): {rss_kib(proc.pid, 'VmHWM') / 1024:.0f} MiB")
            print(f"parse workers' peak RSS (sampled): {watch.worker_peak / 1024:.0f} MiB")
            print(f"worst /healthz: {watch.worst_health * 1000:.0f} ms, failures {watch.failures}")
            print("Traceback in the log:", "Traceback" in (root / "daemon.log").read_text())
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wide-open", action="store_true", help="pre-checks out of the way")
    parser.add_argument("--parse-timeout", type=float, default=5.0)
    print(machine())
    asyncio.run(run(parser.parse_args()))
