"""The daemon under systemd's eyes: sd_notify on a socket of the test's own, SIGHUP reloads,
SIGTERM drains. The daemon runs as a real subprocess, as ``Type=notify`` would start it."""

import asyncio
import contextlib
import signal
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from ingest.bus import Bus
from ingest.schema import Identity, InboundMessage
from ingest.topology import INBOUND, ROUTED_QUEUE, ROUTER_QUEUE
from tests.daemon_fixtures import DaemonProcess
from tests.seed import seeded
from tests.support.broker import filled, publish_inbound, take
from tests.support.mail import PASSWORD, USER, Dovecot, dovecot
from tests.support.net import free_port, listening
from tests.support.waiting import until

__all__ = ["dovecot"]


class Notifications:
    """Datagrams the daemon sends to ``NOTIFY_SOCKET``, in arrival order, with times."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen: list[tuple[float, str]] = []
        self._new = asyncio.Event()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            self.seen.append((time.monotonic(), data.decode()))
            self._new.set()

    def lines(self, prefix: str, since: int = 0) -> list[str]:
        return [
            line
            for _, text in self.seen[since:]
            for line in text.splitlines()
            if line.startswith(prefix)
        ]

    async def wait(self, prefix: str, *, since: int = 0, timeout: float = 30) -> int:
        """Index of the first datagram from ``since`` on that has a line ``prefix…``."""
        async with asyncio.timeout(timeout):
            while True:
                for i in range(since, len(self.seen)):
                    if any(ln.startswith(prefix) for ln in self.seen[i][1].splitlines()):
                        return i
                self._new.clear()
                await self._new.wait()


@pytest.fixture
async def notify(tmp_path: Path) -> AsyncIterator[tuple[str, Notifications]]:
    """A Unix datagram socket bound by the test, as systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        path = Path(tempfile.mkdtemp(prefix="omniroute-notify-")) / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    notes = Notifications(sock)
    pump = asyncio.create_task(notes.pump())
    yield str(path), notes
    pump.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pump
    sock.close()


def _systemd_env(daemon: DaemonProcess, notify_path: str) -> None:
    daemon.env["NOTIFY_SOCKET"] = notify_path
    daemon.env["WATCHDOG_USEC"] = "1000000"
    daemon.env.pop("WATCHDOG_PID", None)


def _set_port(config: Path, port: int, *extra: str) -> None:
    text = config.read_text().replace("port = 0", f"port = {port}")
    config.write_text(text + "".join(extra))


def _stranger(i: int) -> InboundMessage:
    return InboundMessage(
        channel="email",
        external_id=f"life-{i}-{time.monotonic_ns()}",
        sender=Identity(kind="email", address=f"stranger{i}@nowhere.test"),
        text="hello",
    )


async def _route_one(bus: Bus, message: InboundMessage, timeout: float = 15) -> str:
    """Publish one message and return the routing key it was routed with (what is routed
    before it, taken off the queue and dropped)."""
    await bus.publish(INBOUND, message.channel, message, message_id=message.id)
    [got] = await take(bus, ROUTED_QUEUE, 1, timeout, keep=lambda got: got.message_id == message.id)
    return got.routing_key


async def _ids_in(bus: Bus, queue_name: str) -> list[str]:
    """Every message id left in a queue (taken off it: the queue is read once, at the end)."""
    return [got.message_id or "" for got in await take(bus, queue_name, quiet=0, timeout=60)]


@pytest.mark.slow
async def test_notify_watchdog_and_sighup_reload(
    daemon: DaemonProcess,
    notify: tuple[str, Notifications],
    bus: Bus,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """READY=1 comes after the port listens, WATCHDOG=1 keeps coming, SIGHUP applies a new
    routing.default_team to the next decision, and a broken file on SIGHUP is refused."""
    path, notes = notify
    await seeded(sqlite_url)
    port = free_port()
    _set_port(daemon.config, port)
    _systemd_env(daemon, path)
    log = tmp_path / "daemon.log"
    proc = daemon.start("router", log=log)

    ready = await notes.wait("READY=1")
    assert listening(port), "READY=1 was sent before the HTTP port listened"
    assert notes.lines("STATUS=migrating"), notes.seen
    assert notes.lines("STATUS=running", since=ready)
    await notes.wait("WATCHDOG=1", since=ready, timeout=5)
    start = len(notes.seen)
    await asyncio.sleep(2.2)  # WATCHDOG_USEC=1 s: a ping every 0.5 s
    assert len(notes.lines("WATCHDOG=1", since=start)) >= 3

    assert await _route_one(bus, _stranger(1)) == "triage"

    daemon.config.write_text(
        daemon.config.read_text().replace(
            'default_region = "TR"', 'default_region = "TR"\ndefault_team = "network"'
        )
    )
    mark = len(notes.seen)
    proc.send_signal(signal.SIGHUP)
    reloading = await notes.wait("RELOADING=1", since=mark, timeout=10)
    assert notes.lines("MONOTONIC_USEC=", since=reloading)
    await notes.wait("READY=1", since=reloading, timeout=10)
    assert await _route_one(bus, _stranger(2)) == "team.network"

    good = daemon.config.read_text()
    daemon.config.write_text(good + "\n[routing]\nno_such_key = 1\n")
    mark = len(notes.seen)
    proc.send_signal(signal.SIGHUP)
    refused = await notes.wait("STATUS=reload refused", since=mark, timeout=10)
    assert notes.lines("READY=1", since=refused)
    await until(lambda: '"daemon.reload_refused"' in log.read_text(), 5, "a refusal logged")
    assert proc.poll() is None
    assert await _route_one(bus, _stranger(3)) == "team.network", "the old config must go on"

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 25) == 0
    assert notes.lines("STOPPING=1")
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
async def test_sigterm_mid_flow_drains_readyz_503_and_loses_nothing(
    daemon: DaemonProcess,
    notify: tuple[str, Notifications],
    bus: Bus,
    sqlite_url: str,
    tmp_path: Path,
) -> None:
    """SIGTERM while messages flow: /readyz answers 503 before the port closes, the process
    exits 0 within shutdown_timeout, and every message is routed or still queued."""
    path, notes = notify
    await seeded(sqlite_url)
    port = free_port()
    _set_port(daemon.config, port)
    _systemd_env(daemon, path)
    # enough that the 1 s readiness grace and the drain cannot empty the queue
    messages = [_stranger(i) for i in range(5000)]
    await publish_inbound(bus, messages)
    log = tmp_path / "daemon.log"
    proc = daemon.start("router", log=log)
    await notes.wait("READY=1")
    await filled(bus, ROUTED_QUEUE, 50, timeout=30)

    async with httpx.AsyncClient(timeout=2) as client:
        assert (await client.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200
        proc.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        statuses: list[int] = []
        with contextlib.suppress(httpx.TransportError):
            async with asyncio.timeout(10):
                while True:
                    response = await client.get(f"http://127.0.0.1:{port}/readyz")
                    statuses.append(response.status_code)
                    await asyncio.sleep(0.05)
    assert 503 in statuses, statuses
    assert await asyncio.to_thread(proc.wait, 25) == 0
    assert time.monotonic() - stopped_at < 20 + 2  # shutdown_timeout = 20
    left_in_router, _ = await bus.queue_depth(ROUTER_QUEUE)
    print(f"left in omniroute.router after the drain: {left_in_router}")
    assert left_in_router > 0, "the SIGTERM must land mid-flow for this test to mean anything"

    routed = set(await _ids_in(bus, ROUTED_QUEUE))
    queued = set(await _ids_in(bus, ROUTER_QUEUE))
    lost = [m.id for m in messages if m.id not in routed | queued]
    assert not lost, f"{len(lost)} messages lost"
    text = log.read_text()
    assert '"daemon.stopped"' in text
    assert "Traceback" not in text


@pytest.mark.slow
async def test_sighup_adds_and_removes_mailboxes_and_log_level(
    daemon: DaemonProcess, dovecot: Dovecot, sqlite_url: str, tmp_path: Path
) -> None:
    """Mailboxes added or removed in the file start or stop on SIGHUP, the others go on,
    and a new log.level applies at once."""
    port = free_port()

    def mailbox(name: str, folder: str) -> str:
        return (
            f'\n[[email.mailboxes]]\nname = "{name}"\nhost = "127.0.0.1"\n'
            f'port = {dovecot.port}\nsecurity = "none"\nusername = "{USER}"\n'
            f'password = "{PASSWORD}"\nfolder = "{folder}"\npoll_interval = 1\ntimeout = 5\n'
        )

    def create_folder() -> None:
        client = dovecot.imap()
        try:
            client.create("Second")
        finally:
            client.logout()

    await asyncio.to_thread(create_folder)
    base = daemon.config.read_text().replace("port = 0", f"port = {port}")
    daemon.config.write_text(base + mailbox("first", "INBOX"))
    log = tmp_path / "daemon.log"
    proc = daemon.start("email", log=log)

    async def components() -> dict[str, dict[str, str]]:
        async with httpx.AsyncClient(timeout=2) as client:
            body = (await client.get(f"http://127.0.0.1:{port}/readyz")).json()
        return dict(body["components"])

    async def wait_components(check: Callable[[dict[str, dict[str, str]]], bool]) -> None:
        async def checked() -> bool:
            assert proc.poll() is None
            with contextlib.suppress(httpx.TransportError):
                return check(await components())
            return False

        await until(checked, 20, "the mailboxes' components as wanted")

    await wait_components(lambda c: c.get("email.first", {}).get("state") == "up")
    daemon.config.write_text(
        base.replace('format = "json"', 'format = "json"\nlevel = "debug"')
        + mailbox("first", "INBOX")
        + mailbox("second", "Second")
    )
    proc.send_signal(signal.SIGHUP)
    await wait_components(lambda c: c.get("email.second", {}).get("state") == "up")
    assert '"email.mailbox_added"' in log.read_text()
    assert '"level": "debug"' in log.read_text(), "log.level = debug did not apply"

    daemon.config.write_text(base + mailbox("second", "Second"))
    proc.send_signal(signal.SIGHUP)
    await wait_components(lambda c: "email.first" not in c)
    assert (await components())["email.second"]["state"] == "up"
    assert '"email.mailbox_removed"' in log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 25) == 0
