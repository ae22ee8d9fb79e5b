"""The local spool: accepted input waits on disk while the broker is away.

Sole purpose: a webhook may answer 200 only once a message is safe, and "safe" must not
depend on the broker being up. ``SpooledSink`` publishes through the broker when it can;
when the broker fails (``TransientError``) it writes the message to the spool directory and
returns, and ``drain()`` republishes the spooled messages in order once the broker is back.

Invariants:
- One file per message, ``<seq>.msg``, written as ``.<seq>.tmp``, fsynced, renamed, and the
  directory fsynced: a crash leaves either a whole entry or a stray ``.tmp`` (removed at the
  next start), never a half entry under a real name.
- Each entry carries its length and SHA-256 in a header line; an entry that fails the check
  (a torn or damaged file) is renamed ``*.corrupt``, logged and skipped, never a crash.
- An entry is deleted only after the broker confirmed its publish (at-least-once: a crash
  between the two republishes it, and consumers deduplicate on ``message_id``).
- While anything is spooled, new input is spooled behind it, so the order is kept.
- At most ``max_messages`` entries: beyond that ``submit`` raises ``SpoolFull`` (503).
- Entries left by a previous run are found by ``open()`` and drained like any other.
"""

import asyncio
import hashlib
import heapq
import os
import re
from pathlib import Path
from typing import Protocol

import structlog
from pydantic import ValidationError

from ingest.backoff import Backoff, pause
from ingest.errors import TransientError
from ingest.metrics import Metrics
from ingest.protocols import InboundSink
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.spool")

MAGIC = b"OMNIROUTE-SPOOL-1"
_ENTRY = re.compile(r"^([0-9]{12})\.msg$")
_CORRUPT = re.compile(r"^([0-9]{12})\.corrupt$")
_TMP = re.compile(r"^\.[0-9]{12}\.tmp$")


class SpoolFull(TransientError):
    """The spool holds ``max_messages`` entries; the input is refused (HTTP 503)."""


class SpoolLimits(Protocol):
    """What the spool reads from its settings (``connectors.settings.SpoolSettings``)."""

    max_messages: int
    publish_timeout: float
    retry_initial: float
    retry_max: float


class SpooledSink:
    """An ``InboundSink`` that falls back to a crash-safe local spool; see the module doc."""

    def __init__(
        self, sink: InboundSink, directory: Path, settings: SpoolLimits, metrics: Metrics
    ) -> None:
        self._sink = sink
        self._dir = directory
        self._settings = settings
        self._metrics = metrics
        self._ready: list[int] = []  # heap of the sequence numbers on disk
        self._pending: set[int] = set()  # sequence numbers being written right now
        self._next = 1
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._degraded = False

    @property
    def depth(self) -> int:
        """Messages in the spool, including those being written."""
        return len(self._ready) + len(self._pending)

    @property
    def directory(self) -> Path:
        return self._dir

    def probe(self) -> str | None:
        """A ``Health`` probe: a problem only when the spool refuses input."""
        if self.depth >= self._settings.max_messages:
            return f"full ({self.depth} messages)"
        return None

    async def open(self) -> None:
        """Create the directory and take over what a previous run left; idempotent."""
        async with self._open_lock:
            if self._opened:
                return
            try:
                seqs, highest = await asyncio.to_thread(_scan, self._dir)
            except OSError as exc:
                raise TransientError(f"spool directory {self._dir}: {exc}") from exc
            self._ready = list(seqs)
            heapq.heapify(self._ready)
            self._next = highest + 1
            self._opened = True
            self._gauge()
            if seqs:
                log.info("spool.found", depth=len(seqs), directory=str(self._dir))
                self._wake.set()

    async def submit(self, message: InboundMessage) -> None:
        """Return once the broker confirmed the message or the spool fsynced it."""
        await self.open()
        if not self.depth:
            try:
                await self._publish(message)
            except TransientError as exc:
                self._enter_degraded(exc)
            else:
                return
        await self._append(message)

    async def flush(self) -> int:
        """Republish spooled entries in order until the spool is empty; returns how many.

        Raises ``TransientError`` at the first publish that fails; what was published before
        it is already deleted. The drain mode of tests ("run until idle").
        """
        await self.open()
        published = 0
        async with self._flush_lock:
            while self._ready:
                seq = self._ready[0]
                if self._pending and min(self._pending) < seq:
                    break  # an earlier entry is still being written: keep the order
                path = self._path(seq)
                message = await self._load(path)
                if message is not None:
                    await self._publish(message)
                    try:
                        await asyncio.to_thread(_remove, path)
                    except OSError as exc:
                        raise TransientError(f"spool entry {path.name}: {exc}") from exc
                    published += 1
                heapq.heappop(self._ready)
                self._gauge()
        if published and not self.depth and self._degraded:
            self._degraded = False
            log.info("spool.drained", published=published)
        return published

    async def drain(self, stop: asyncio.Event) -> None:
        """Republish spooled input whenever there is some, with capped backoff while the
        broker is away; returns when ``stop`` is set (what is left waits for the next run)."""
        await self.open()
        backoff = Backoff(self._settings.retry_initial, self._settings.retry_max)
        while not stop.is_set():
            # cleared before looking, so a write that ends while we look is not missed
            self._wake.clear()
            if not self._ready:
                await _wait_any(stop, self._wake)
                continue
            waiting = len(self._ready)
            try:
                await self.flush()
            except TransientError as exc:
                self._enter_degraded(exc)
                await pause(backoff.next(), stop)
                continue
            backoff.reset()
            if self._ready and len(self._ready) == waiting:
                # no progress: an earlier entry is still being written (issue 13). Wait for
                # that write to end; flushing again at once would spin the event loop
                await _wait_any(stop, self._wake)

    async def _publish(self, message: InboundMessage) -> None:
        try:
            async with asyncio.timeout(self._settings.publish_timeout):
                await self._sink.submit(message)
        except TimeoutError as exc:
            raise TransientError("broker did not confirm in time") from exc

    async def _append(self, message: InboundMessage) -> None:
        if self.depth >= self._settings.max_messages:
            log.warning("spool.full", depth=self.depth)
            raise SpoolFull(f"spool holds {self.depth} messages (spool.max_messages)")
        seq = self._next
        self._next += 1
        self._pending.add(seq)
        self._gauge()
        body = message.model_dump_json().encode()
        try:
            await asyncio.to_thread(_write, self._dir, seq, body)
        except OSError as exc:
            log.error("spool.write_failed", error=str(exc))
            raise TransientError(f"spool write failed: {exc}") from exc
        else:
            heapq.heappush(self._ready, seq)
        finally:
            self._pending.discard(seq)
            self._gauge()
            self._wake.set()

    async def _load(self, path: Path) -> InboundMessage | None:
        try:
            body = await asyncio.to_thread(_read, path)
            if body is not None:
                return InboundMessage.model_validate_json(body)
        except (OSError, ValidationError) as exc:
            log.error("spool.unreadable", entry=path.name, error=str(exc)[:200])
        log.error("spool.corrupt_entry", entry=path.name)
        try:
            await asyncio.to_thread(path.replace, path.with_suffix(".corrupt"))
        except OSError as exc:
            raise TransientError(f"spool entry {path.name}: {exc}") from exc
        return None

    def _enter_degraded(self, exc: Exception) -> None:
        if not self._degraded:
            self._degraded = True
            log.warning("spool.broker_away", error=str(exc)[:300])

    def _path(self, seq: int) -> Path:
        return self._dir / f"{seq:012d}.msg"

    def _gauge(self) -> None:
        self._metrics.spool_depth.set(self.depth)


async def _wait_any(*events: asyncio.Event, timeout: float | None = None) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


# --- blocking file work, run in a worker thread -----------------------------------------


def _scan(directory: Path) -> tuple[list[int], int]:
    """The entries to drain, and the highest number in use (set-aside ones included)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    seqs: list[int] = []
    highest = 0
    for entry in os.scandir(directory):
        if match := _ENTRY.match(entry.name):
            seqs.append(int(match.group(1)))
        elif match := _CORRUPT.match(entry.name):
            highest = max(highest, int(match.group(1)))
        elif _TMP.match(entry.name):
            os.unlink(entry.path)  # a write that never reached its rename: never acknowledged
    return sorted(seqs), max(highest, *seqs, 0)


def _write(directory: Path, seq: int, body: bytes) -> None:
    header = b"%s %d %s\n" % (MAGIC, len(body), hashlib.sha256(body).hexdigest().encode())
    tmp = directory / f".{seq:012d}.tmp"
    with open(tmp, "xb") as handle:
        handle.write(header + body)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / f"{seq:012d}.msg")
    _fsync_dir(directory)


def _read(path: Path) -> bytes | None:
    """The entry's body, or None when its header, length or checksum is wrong."""
    data = path.read_bytes()
    header, newline, body = data.partition(b"\n")
    parts = header.split(b" ")
    if not newline or len(parts) != 3 or parts[0] != MAGIC or not parts[1].isdigit():
        return None
    if int(parts[1]) != len(body) or hashlib.sha256(body).hexdigest().encode() != parts[2]:
        return None
    return body


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
