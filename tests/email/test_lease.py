"""Leases: two email pollers on one mailbox, one polls; kill it and the other takes over.

Two real ``omniroute run --component email`` processes share a Dovecot mailbox, a
PostgreSQL directory and a vhost, each with its own HTTP port (as on two hosts)."""

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from ingest.bus import Bus
from ingest.topology import ROUTER_QUEUE
from routers.store.lease import FileLease, PgLease
from tests.daemon_fixtures import ROOT, DaemonProcess, write_config
from tests.support.broker import tally
from tests.support.mail import Dovecot, mailbox_toml, make_mail
from tests.support.net import free_port
from tests.support.waiting import until


def _config(root: Path, amqp_url: str, pg_url: str, imap_port: int, http_port: int) -> Path:
    root.mkdir()
    path = write_config(root / "omniroute.toml", amqp_url, pg_url, port=str(http_port))
    mailbox = mailbox_toml(
        imap_port,
        poll_interval=1,
        idle_renew=5,
        timeout=5,
        backoff_initial=0.5,
        backoff_max=2,
    )
    with path.open("a", encoding="utf-8") as fh:
        fh.write(mailbox)
    return path


async def _state(port: int) -> str | None:
    """The mailbox's state in the process's /readyz, or None while it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            response = await client.get(f"http://127.0.0.1:{port}/readyz")
    except httpx.HTTPError:
        return None
    components = response.json().get("components", {})
    state = components.get("email.support", {}).get("state")
    return str(state) if state is not None else None


async def _wait_state(
    port: int, want: str, proc: "subprocess.Popen[bytes]", timeout: float
) -> None:
    async def reached() -> bool:
        assert proc.poll() is None, "the daemon exited"
        return await _state(port) == want

    await until(reached, timeout, f"email.support {want}")


async def _router_ids(bus: Bus, want: set[str], timeout: float) -> set[str]:
    """Take messages from omniroute.router until every wanted Message-ID was seen (bounded)."""
    return set(await tally(bus, ROUTER_QUEUE, want, timeout, key=lambda t: t.json()["external_id"]))


def _append(server: Dovecot, ids: list[str]) -> None:
    for mid in ids:
        server.append(make_mail(mid, subject=f"lease {mid}"))


@pytest.mark.slow
async def test_one_poller_per_mailbox_and_takeover_after_sigkill(
    tmp_path: Path, dovecot: Dovecot, pg_url: str, amqp_url: str, bus: Bus
) -> None:
    """Only the lease holder polls; SIGKILL frees the lease and the standby takes over
    within 10 s, and every mail appended before and after the kill reaches the router."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    env["PYTHONPATH"] = str(ROOT)
    port_a, port_b = free_port(), free_port()
    a = DaemonProcess(_config(tmp_path / "a", amqp_url, pg_url, dovecot.port, port_a), env)
    b = DaemonProcess(_config(tmp_path / "b", amqp_url, pg_url, dovecot.port, port_b), env)
    try:
        proc_a = a.start("email")
        await _wait_state(port_a, "up", proc_a, timeout=30)
        proc_b = b.start("email")
        await _wait_state(port_b, "standby", proc_b, timeout=30)
        async with httpx.AsyncClient(timeout=2) as client:
            ready_b = await client.get(f"http://127.0.0.1:{port_b}/readyz")
        assert ready_b.status_code == 200, ready_b.text

        before = [f"before-{i}@lease.test" for i in range(10)]
        await asyncio.to_thread(_append, dovecot, before)
        assert await _router_ids(bus, set(before), timeout=20) == set(before)
        log_b = (tmp_path / "b" / "daemon.log").read_text()
        assert '"email.taken"' not in log_b, "the standby instance polled the mailbox"
        assert '"email.taken"' in (tmp_path / "a" / "daemon.log").read_text()

        after = [f"after-{i}@lease.test" for i in range(10)]
        appending = asyncio.create_task(asyncio.to_thread(_append, dovecot, after))
        await asyncio.sleep(0.2)  # the kill lands while mail keeps arriving
        proc_a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(proc_a.wait, 10)
        await _wait_state(port_b, "up", proc_b, timeout=10)
        took = time.monotonic() - killed
        await appending
        got = await _router_ids(bus, set(after), timeout=20)
        print(f"takeover={took:.1f}s")
        assert set(after) <= got, f"lost: {sorted(set(after) - got)}"
        assert '"email.lease_acquired"' in (tmp_path / "b" / "daemon.log").read_text()
    finally:
        a.stop_all()
        b.stop_all()


async def test_pg_lease_is_exclusive_and_frees_on_release(pg_url: str) -> None:
    """Two holders (two processes' worth of connections) never hold one key together."""
    one, two = PgLease(pg_url, check_interval=0.2), PgLease(pg_url, check_interval=0.2)
    try:
        lost = await one.acquire("imap:support")
        assert lost is not None
        assert await two.acquire("imap:support") is None
        assert await two.acquire("imap:other") is not None, "keys are independent"
        await one.release("imap:support")
        assert lost.is_set()
        assert await two.acquire("imap:support") is not None
    finally:
        await one.close()
        await two.close()


async def test_pg_lease_given_up_when_its_session_is_killed(pg_url: str) -> None:
    """A lease whose connection died (here: the server ended it) is reported lost, so the
    poller stops instead of polling beside the instance that takes over."""
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

    lease = PgLease(pg_url, check_interval=0.2, timeout=2)
    other = PgLease(pg_url)
    try:
        lost = await lease.acquire("twitter:42")
        assert lost is not None
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'omniroute-lease' AND datname = current_database()"
            )
        finally:
            await admin.close()
        async with asyncio.timeout(5):
            await lost.wait()
        assert await other.acquire("twitter:42") is not None
    finally:
        await lease.close()
        await other.close()


async def test_file_lease_is_exclusive_per_open_and_frees_on_release(tmp_path: Path) -> None:
    """SQLite deployments lock a file in state_dir: a second holder waits its turn."""
    one, two = FileLease(tmp_path / "leases"), FileLease(tmp_path / "leases")
    assert await one.acquire("imap:support") is not None
    assert await two.acquire("imap:support") is None
    await one.release("imap:support")
    assert await two.acquire("imap:support") is not None
    await two.close()
