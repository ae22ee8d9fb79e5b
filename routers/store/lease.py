"""Leases: at most one live process polls a given mailbox or X account (``ingest.protocols.Lease``).

Sole purpose: let several ``omniroute@email`` / ``omniroute@twitter`` instances run for
redundancy while exactly one polls each source, and let another take over within seconds
when the holder dies.

- **PostgreSQL** (several hosts): a session-level advisory lock,
  ``pg_try_advisory_lock(k)`` with ``k`` a stable 64-bit hash of ``omniroute:lease:<key>``,
  taken on a connection of its own (not from the SQLAlchemy pool) and kept open for as long
  as the lease is held. The lock lives exactly as long as that session: a process that is
  killed closes its socket and PostgreSQL frees the lock at once; a host that vanishes is
  noticed by the server's TCP keepalives (set per session below: about 25 s). On our side a
  ``SELECT 1`` every ``check_interval`` under a deadline, and the connection's termination
  callback, notice a connection that died silently: the lease is then given up (its
  ``lost`` event is set) and polling stops before another instance can have started for
  long. The lease connection must reach PostgreSQL directly or through a session-mode
  pooler (PgBouncer in transaction mode cannot hold a session lock).
- **SQLite** (one host): ``fcntl.flock(LOCK_EX | LOCK_NB)`` on a file in
  ``state_dir/leases``; the kernel frees it when the process dies. Non-blocking, so it is
  safe on the event loop.

Why not RabbitMQ's single-active-consumer: that elects one consumer of a *queue*, but a
mailbox or an X account is not a queue; we would need a dummy queue per source, a consumer
held open only as a token, and the election would then follow the broker connection rather
than the database the poller writes its cursors to. The directory database is already
shared by every instance that may poll (cursors and seen ids live there), so a lock in it
needs no new moving part, frees on process death by construction, and ``pg_locks`` shows
who holds what. A poller that cannot reach the database could not store its cursor anyway.
"""

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import structlog
from sqlalchemy.engine import make_url

from ingest.errors import TransientError

log = structlog.get_logger("omniroute.lease")

#: server-side keepalives: a vanished client's session (and lock) ends after about
#: idle + interval * count seconds; tcp_user_timeout bounds unacknowledged writes (ms)
SERVER_SETTINGS = {
    "application_name": "omniroute-lease",
    "tcp_keepalives_idle": "10",
    "tcp_keepalives_interval": "5",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "25000",
}


def lock_id(key: str) -> int:
    """A stable signed 64-bit advisory lock key (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b(f"omniroute:lease:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclass
class _Held:
    conn: asyncpg.Connection
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    watch: "asyncio.Task[None] | None" = None


class PgLease:
    """Advisory-lock leases on the PostgreSQL directory, one connection per held key."""

    def __init__(self, url: str, *, check_interval: float = 5.0, timeout: float = 5.0) -> None:
        parsed = make_url(url)
        self._dsn = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self._check_interval = check_interval
        self._timeout = timeout
        self._held: dict[str, _Held] = {}

    async def acquire(self, key: str) -> asyncio.Event | None:
        held = self._held.get(key)
        if held is not None and not held.lost.is_set():
            return held.lost
        if held is not None:
            await self.release(key)
        try:
            async with asyncio.timeout(self._timeout):
                conn = await asyncpg.connect(
                    self._dsn, timeout=self._timeout, server_settings=SERVER_SETTINGS
                )
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise TransientError(f"lease database: {exc!r}") from exc
        try:
            got = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", lock_id(key), timeout=self._timeout
            )
        except asyncio.CancelledError:
            conn.terminate()
            raise
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            conn.terminate()
            raise TransientError(f"lease database: {exc!r}") from exc
        if not got:
            await self._close(conn)
            return None
        held = _Held(conn)
        conn.add_termination_listener(lambda _conn: held.lost.set())
        held.watch = asyncio.create_task(self._watch(key, held), name=f"lease:{key}")
        self._held[key] = held
        log.info("lease.acquired", key=key)
        return held.lost

    async def _watch(self, key: str, held: _Held) -> None:
        """``SELECT 1`` every ``check_interval``: a connection that died silently gives the
        lease up instead of polling on while another instance takes over."""
        while not held.lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._check_interval):
                    await held.lost.wait()
            if held.lost.is_set():
                break
            try:
                await held.conn.fetchval("SELECT 1", timeout=self._timeout)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("lease.lost", key=key, error=repr(exc))
                held.lost.set()
                return
        log.warning("lease.lost", key=key, error="connection closed")

    async def release(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        if held.watch is not None:
            held.watch.cancel()
            # wait for the watcher without swallowing a cancellation of release() itself
            await asyncio.wait({held.watch})
        held.lost.set()
        await self._close(held.conn)  # closing the session releases its advisory locks
        log.info("lease.released", key=key)

    async def _close(self, conn: asyncpg.Connection) -> None:
        try:
            await conn.close(timeout=self._timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn.terminate()

    async def close(self) -> None:
        for key in list(self._held):
            await self.release(key)


class FileLease:
    """``flock`` leases in a directory: for SQLite, where every instance shares one host."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._held: dict[str, tuple[int, asyncio.Event]] = {}

    def _path(self, key: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        return self._directory / f"{safe}.{lock_id(key) & 0xFFFFFFFF:08x}.lock"

    async def acquire(self, key: str) -> asyncio.Event | None:
        if key in self._held:
            return self._held[key][1]
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TransientError(f"lease file: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise TransientError(f"lease file: {exc}") from exc
        lost = asyncio.Event()
        self._held[key] = (fd, lost)
        log.info("lease.acquired", key=key)
        return lost

    async def release(self, key: str) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        fd, lost = held
        lost.set()
        os.close(fd)  # closing the last descriptor drops the flock
        log.info("lease.released", key=key)

    async def close(self) -> None:
        for key in list(self._held):
            await self.release(key)


def lease_for(database_url: str, state_dir: Path) -> PgLease | FileLease:
    """PostgreSQL directory: advisory locks; SQLite: lock files in ``state_dir/leases``."""
    if make_url(database_url).get_backend_name() == "postgresql":
        return PgLease(database_url)
    return FileLease(state_dir / "leases")
