"""The email channel: IMAP mailboxes in (aioimaplib), replies out (aiosmtplib).

Invariants (issue 4):

- A mail is flagged ``\\Seen $Omniroute`` (or moved) only after ``sink.submit`` returned,
  that is after the broker confirmed it; the cursor (UIDVALIDITY and the last UID taken,
  per mailbox in the ``CursorStore``) moves only after that. What is new is
  ``UID SEARCH UID last+1:*``, never UNSEEN, so a person reading the mailbox in webmail
  does not make mail vanish (mail already flagged ``$Omniroute`` is left out). A changed
  UIDVALIDITY rescans everything not flagged ``$Omniroute`` (or, with ``after = move:…``,
  everything still in the folder).
- Intake works per batch of ``batch_size`` mails: one seen-store transaction for the
  batch's slots and one for its Message-IDs, the new mails published concurrently, one
  ``UID STORE`` for what the broker confirmed, one cursor write. When a publish fails, the
  mails confirmed are flagged anyway, the failed ones are forgotten and left unflagged,
  and the cursor stops just before the first of them.
- Copies are dropped by Message-ID (a content hash when there is none) in the
  ``SeenStore``. Each (mailbox, UIDVALIDITY, UID) slot is also recorded, so a mail whose
  Message-ID was recorded by a run killed before the broker confirmed it is submitted
  again rather than lost: at-least-once, with a duplicate only in that window.
- Every IMAP and SMTP await runs under a deadline. STARTTLS is never opportunistic: a
  server that does not offer it is an error before any credential is sent.
"""

import asyncio
import contextlib
import json
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid
from typing import Any

import aioimaplib
import aiosmtplib
import structlog

from connectors.leasing import LeaseKeeper
from connectors.mail_scan import SCAN_HEAD, Limits
from connectors.mime import stand_in
from connectors.parse_pool import ParseFailed, ParsePool, PoolSettings
from connectors.settings import EmailSettings, MailboxSettings, SmtpSettings
from ingest.errors import AuthError, ConfigError, PermanentSendError, TransientError
from ingest.health import Health
from ingest.identities import InvalidIdentity, normalise_email, redact
from ingest.protocols import (
    CursorStore,
    InboundSink,
    Lease,
    ReplyContext,
    SeenStore,
    SendResult,
)
from ingest.schema import InboundMessage, ReplyRequest

log = structlog.get_logger("omniroute.email")

KEYWORD = "$Omniroute"
SEEN_CHANNEL = "email"
SLOT_CHANNEL = "email.slot"
#: confirmed publishes one mailbox worker awaits at once (the rest of a wider batch waits)
PUBLISH_CONCURRENCY = 100
_FETCH_HEAD = re.compile(rb"UID (\d+)")
_FETCH_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
#: bodies of one batch; two batches are held at once (one parsed, one published)
BATCH_BYTES = 16 * 1024 * 1024
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
_RE_PREFIX = re.compile(r"^\s*((re|aw|sv|ynt|fwd?)(\[\d+\])?\s*:\s*)+", re.IGNORECASE)
_IMAP_ERRORS = (OSError, TimeoutError, aioimaplib.AioImapException)


def pool_settings(settings: EmailSettings) -> PoolSettings:
    return PoolSettings(
        workers=settings.parse_workers,
        memory=settings.parse_memory,
        timeout=settings.parse_timeout,
        limits=Limits(
            max_header_bytes=settings.max_header_bytes,
            max_encoded_words=settings.max_encoded_words,
            max_mime_depth=settings.max_mime_depth,
            max_parts=settings.max_parts,
        ),
    )


def cursor_key(mailbox: str) -> str:
    return "imap:" + mailbox


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def _quote(name: str) -> str:
    """An IMAP quoted string (RFC 3501 section 4.3) for folder names with spaces."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- one IMAP connection ----------------------------------------------------------------


class ImapSession:
    """A logged-in, selected IMAP connection whose every command has a deadline."""

    def __init__(self, box: MailboxSettings) -> None:
        self.box = box
        self.lost = asyncio.Event()
        self.uidvalidity = 0
        self.uidnext = 0
        self._client: Any = None

    @classmethod
    async def open(cls, box: MailboxSettings) -> "ImapSession":
        session = cls(box)
        try:
            await session._connect()
        except BaseException:
            session.abort()
            raise
        return session

    async def _connect(self) -> None:
        box = self.box
        context = _tls_context(box.ca_file) if box.security == "tls" else None
        try:
            async with asyncio.timeout(box.timeout):
                self._client = aioimaplib.IMAP4(
                    host=box.host,
                    port=box.port,
                    timeout=box.timeout,
                    conn_lost_cb=self._on_lost,
                    ssl_context=context,
                )
                await self._client.wait_hello_from_server()
        except _IMAP_ERRORS as exc:
            raise TransientError(f"cannot connect to {box.host}:{box.port}: {exc!r}") from exc
        if box.security == "starttls":
            await self._starttls()
        if "LOGINDISABLED" in self._client.protocol.capabilities:
            raise ConfigError("the server disables LOGIN on this connection (LOGINDISABLED)")
        password = box.password.get_secret_value() if box.password else ""
        response = await self.call(
            lambda: self._client.login(box.username, password), "LOGIN", check=False
        )
        if response.result != "OK":
            text = b" ".join(line for line in response.lines if isinstance(line, bytes))
            if b"UNAVAILABLE" in text or b"SERVERBUG" in text:
                raise TransientError("login temporarily refused: " + text.decode(errors="replace"))
            raise AuthError(f"login refused for {redact(box.username)}")
        response = await self.call(lambda: self._client.select(_quote(box.folder)), "SELECT")
        for line in response.lines:
            if isinstance(line, bytes):
                if m := _UIDVALIDITY.search(line):
                    self.uidvalidity = int(m.group(1))
                if m := _UIDNEXT.search(line):
                    self.uidnext = int(m.group(1))
        if not self.uidvalidity:
            raise TransientError("SELECT answered without UIDVALIDITY")
        permanent = next(
            (line for line in response.lines if b"[PERMANENTFLAGS" in bytes(line)), None
        )
        if permanent is not None and b"\\*" not in permanent and KEYWORD.encode() not in permanent:
            # RFC 3501 7.1: without \* the server cannot keep our keyword, and a rescan after
            # a UIDVALIDITY change could not tell taken mail from new
            raise ConfigError(
                f"{box.folder} cannot keep the {KEYWORD} keyword (PERMANENTFLAGS); "
                "use after = move:FOLDER"
            )

    async def _starttls(self) -> None:
        """RFC 3501 section 6.2.1; aioimaplib has no STARTTLS, so the transport is upgraded
        here with ``loop.start_tls`` and the capabilities are read again afterwards."""
        protocol = self._client.protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ConfigError(
                "security = starttls but the server does not offer STARTTLS; "
                "refusing to log in in plaintext"
            )
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        await self.call(lambda: protocol.execute(command), "STARTTLS")
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.box.timeout):
                protocol.transport = await loop.start_tls(
                    protocol.transport,
                    protocol,
                    _tls_context(self.box.ca_file),
                    server_hostname=self.box.host,
                )
        except (OSError, TimeoutError) as exc:
            raise TransientError(f"TLS handshake after STARTTLS failed: {exc!r}") from exc
        await self.call(protocol.capability, "CAPABILITY", check=False)

    def _on_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    @property
    def has_idle(self) -> bool:
        return bool(self._client.has_capability("IDLE"))

    async def call(
        self, command: Callable[[], Awaitable[Any]], what: str, *, check: bool = True
    ) -> Any:
        """Run one command under the mailbox deadline; library errors become ``TransientError``."""
        if self.lost.is_set():
            raise TransientError("connection lost")
        try:
            async with asyncio.timeout(self.box.timeout):
                response = await command()
        except _IMAP_ERRORS as exc:
            raise TransientError(f"{what} failed: {exc!r}") from exc
        if check and response is not None and response.result != "OK":
            raise TransientError(f"{what} answered {response.result}: {response.lines[-1:]!r}")
        return response

    async def search(self, *criteria: str) -> list[int]:
        response = await self.call(
            lambda: self._client.uid_search(*criteria, charset=None), "UID SEARCH"
        )
        uids: list[int] = []
        for line in response.lines[:-1]:
            if isinstance(line, bytes):
                uids.extend(int(word) for word in line.split() if word.isdigit())
        return sorted(set(uids))

    async def fetch(self, uids: list[int], *, first: int | None = None) -> list[tuple[int, bytes]]:
        """``UID FETCH … (UID BODY.PEEK[])``: the bodies without setting ``\\Seen``; with
        ``first``, only each mail's first ``first`` bytes (RFC 3501 6.4.5, ``<0.n>``)."""
        if not uids:
            return []
        uid_set = ",".join(str(u) for u in uids)
        section = "BODY.PEEK[]" if first is None else f"BODY.PEEK[]<0.{first}>"
        response = await self.call(
            lambda: self._client.uid("fetch", uid_set, f"(UID {section})"), "UID FETCH"
        )
        out: list[tuple[int, bytes]] = []
        uid: int | None = None
        for line in response.lines:
            if isinstance(line, bytes):
                m = _FETCH_HEAD.search(line) if b"FETCH" in line else None
                uid = int(m.group(1)) if m else uid
            elif isinstance(line, bytearray) and uid is not None:
                out.append((uid, bytes(line)))
                uid = None
        return out

    async def sizes(self, uids: list[int]) -> dict[int, int]:
        """``UID FETCH … (UID RFC822.SIZE)``: each mail's size, before fetching any body."""
        uid_set = ",".join(str(u) for u in uids)
        response = await self.call(
            lambda: self._client.uid("fetch", uid_set, "(UID RFC822.SIZE)"), "UID FETCH"
        )
        out: dict[int, int] = {}
        for line in response.lines:
            if isinstance(line, bytes | bytearray):
                uid = _FETCH_HEAD.search(line)
                size = _FETCH_SIZE.search(line)
                if uid and size:
                    out[int(uid.group(1))] = int(size.group(1))
        return out

    async def mark(self, uids: list[int]) -> None:
        """Flag the mails as taken, then move them when the mailbox says ``move:FOLDER``."""
        uid_set = ",".join(str(u) for u in uids)
        flags = "(\\Seen " + KEYWORD + ")"
        await self.call(
            lambda: self._client.uid("store", uid_set, "+FLAGS.SILENT", flags), "UID STORE"
        )
        if not self.box.after.startswith("move:"):
            return
        target = _quote(self.box.after.removeprefix("move:"))
        if self._client.has_capability("MOVE"):
            await self.call(lambda: self._client.uid("move", uid_set, target), "UID MOVE")
            return
        await self.call(lambda: self._client.uid("copy", uid_set, target), "UID COPY")
        if self._client.has_capability("UIDPLUS"):
            await self.call(
                lambda: self._client.uid("store", uid_set, "+FLAGS.SILENT", "(\\Deleted)"),
                "UID STORE",
            )
            await self.call(lambda: self._client.uid("expunge", uid_set), "UID EXPUNGE")

    async def wait_for_news(self, stop: asyncio.Event) -> None:
        """IDLE until the server pushes something, ``idle_renew`` passes or ``stop`` is set;
        without IDLE, wait ``poll_interval``."""
        if not self.has_idle:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.box.poll_interval):
                    await stop.wait()
            return
        queue = self._client.protocol.idle_queue
        while not queue.empty():  # pushes left from the last IDLE were answered by a search
            queue.get_nowait()
        renew = self.box.idle_renew
        try:
            async with asyncio.timeout(self.box.timeout):
                idle = await self._client.idle_start(timeout=renew)
        except _IMAP_ERRORS as exc:
            raise TransientError(f"IDLE failed: {exc!r}") from exc
        push = asyncio.ensure_future(self._client.wait_server_push(timeout=renew + 1))
        stopping = asyncio.ensure_future(stop.wait())
        lost = asyncio.ensure_future(self.lost.wait())
        waiters = {push, stopping, lost}
        try:
            await asyncio.wait(waiters, timeout=renew, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if self.lost.is_set():
            raise TransientError("connection lost while idle")
        self._client.idle_done()
        try:
            async with asyncio.timeout(self.box.timeout):
                await idle
        except _IMAP_ERRORS as exc:
            raise TransientError(f"leaving IDLE failed: {exc!r}") from exc

    async def close(self) -> None:
        """Log out politely within the deadline; a dead connection is simply dropped."""
        if self._client is None:
            return
        if not self.lost.is_set():
            with contextlib.suppress(*_IMAP_ERRORS, TransientError):
                await self.call(self._client.logout, "LOGOUT", check=False)
        self.abort()

    def abort(self) -> None:
        client = self._client
        if client is None:
            return
        for task in list(getattr(client, "tasks", ())):
            task.cancel()
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()
        connecting = client._client_task
        if not connecting.done():
            connecting.cancel()
        elif not connecting.cancelled():
            connecting.exception()  # retrieved: a refused connection is reported by open()


# --- intake -----------------------------------------------------------------------------


@dataclass
class _Cursor:
    uidvalidity: int
    last_uid: int


@dataclass
class _Mail:
    """One parsed mail of a batch and what the seen store said about it."""

    uid: int
    slot: str
    message: InboundMessage
    new_slot: bool = False
    new_id: bool = False


class EmailConnector:
    """One supervised aioimaplib worker per mailbox, feeding an ``InboundSink``.

    ``run(stop)`` is the daemon's loop; ``run_until_idle()`` drains every mailbox once and
    returns how many mails it submitted (tests and ``omniroute`` one-shot use). With a
    ``lease``, a worker polls its mailbox only while it holds ``imap:<name>``; otherwise it
    is on "standby" and tries again every ``lease_retry`` seconds. ``reconcile()`` applies
    mailboxes added, removed or changed while ``run`` goes on (SIGHUP)."""

    name = "email"

    def __init__(
        self,
        settings: EmailSettings,
        *,
        sink: InboundSink,
        cursors: CursorStore,
        seen: SeenStore,
        health: Health,
        lease: Lease | None = None,
        lease_retry: float = 3.0,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._cursors = cursors
        self._seen = seen
        self._health = health
        self._lease = lease
        self._lease_retry = lease_retry
        self._pool = ParsePool(pool_settings(settings))
        self._group: asyncio.TaskGroup | None = None
        self._workers: dict[str, tuple[asyncio.Task[None], asyncio.Event]] = {}
        for box in settings.mailboxes:
            health.register(self.component(box))

    @staticmethod
    def component(box: MailboxSettings) -> str:
        """The mailbox's name in ``Health`` (and so in ``/readyz``)."""
        return "email." + box.name

    async def run(self, stop: asyncio.Event) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                for box in self._settings.mailboxes:
                    self._start_worker(box)
                try:
                    await stop.wait()
                finally:
                    self._group = None
                    for _task, box_stop in self._workers.values():
                        box_stop.set()
        finally:
            self._workers.clear()
            await self._pool.close()

    def _start_worker(self, box: MailboxSettings) -> None:
        assert self._group is not None
        box_stop = asyncio.Event()
        task = self._group.create_task(self._supervise(box, box_stop), name="email:" + box.name)
        self._workers[box.name] = (task, box_stop)

    async def reconcile(self, settings: EmailSettings) -> None:
        """Start added mailboxes, stop removed ones, restart changed ones (a new password);
        the others go on untouched. A stopped worker finishes its batch first."""
        old = {box.name: box for box in self._settings.mailboxes}
        new = {box.name: box for box in settings.mailboxes}
        if pool_settings(settings) != pool_settings(self._settings):
            retired, self._pool = self._pool, ParsePool(pool_settings(settings))
            await retired.close(drain=settings.parse_timeout * 2 + 1)
            log.info("email.parse_pool_replaced", workers=settings.parse_workers)
        self._settings = settings
        for name, box in old.items():
            if new.get(name) == box:
                continue
            worker = self._workers.pop(name, None)
            if worker is not None:
                task, box_stop = worker
                box_stop.set()
                try:
                    async with asyncio.timeout(box.timeout * 2):
                        await asyncio.shield(task)
                except TimeoutError:
                    task.cancel()
            if name not in new:
                self._health.forget(self.component(box))
                log.info("email.mailbox_removed", mailbox=name)
        for name, box in new.items():
            if old.get(name) == box:
                continue
            self._health.register(self.component(box))
            event = "email.mailbox_changed" if name in old else "email.mailbox_added"
            log.info(event, mailbox=name)
            if self._group is not None:
                self._start_worker(box)

    async def _supervise(self, box: MailboxSettings, stop: asyncio.Event) -> None:
        """Poll the mailbox while this process holds its lease (always, without a lease)."""
        if self._lease is None:
            await self._poll_loop(box, stop)
            return
        structlog.contextvars.bind_contextvars(connector="email", mailbox=box.name)
        keeper = LeaseKeeper(
            self._lease,
            cursor_key(box.name),
            health=self._health,
            component=self.component(box),
            down=lambda reason: self._down(box, reason),
            log=log.bind(mailbox=box.name),
            prefix="email",
            retry=self._lease_retry,
        )
        await keeper.serve(stop, lambda serving: self._poll_loop(box, serving))

    async def run_until_idle(self) -> int:
        """Take what is waiting in every mailbox, then return; errors are raised."""
        taken = 0
        try:
            for box in self._settings.mailboxes:
                session = await ImapSession.open(box)
                try:
                    self._up(box)
                    taken += await self._drain(box, session)
                finally:
                    await session.close()
        finally:
            await self._pool.close()
            self._pool = ParsePool(pool_settings(self._settings))
        return taken

    async def _poll_loop(self, box: MailboxSettings, stop: asyncio.Event) -> None:
        """Reconnect with capped exponential backoff and jitter; stop on what retrying
        cannot fix (refused credentials, no STARTTLS) and say so once."""
        structlog.contextvars.bind_contextvars(connector="email", mailbox=box.name)
        delay = box.backoff_initial
        while not stop.is_set():
            try:
                session = await ImapSession.open(box)
            except (AuthError, ConfigError) as exc:
                self._down(box, str(exc), final=True)
                return
            except TransientError as exc:
                self._down(box, str(exc))
            except Exception as exc:  # a bug must not end the mailbox: log, back off
                log.exception("email.worker_bug")
                self._down(box, f"bug: {type(exc).__name__}: {exc}")
            else:
                delay = box.backoff_initial
                try:
                    await self._serve(box, session, stop)
                except (AuthError, ConfigError) as exc:
                    self._down(box, str(exc), final=True)
                    return
                except TransientError as exc:
                    self._down(box, str(exc))
                except Exception as exc:  # a bug must not end the mailbox: log, back off
                    log.exception("email.worker_bug")
                    self._down(box, f"bug: {type(exc).__name__}: {exc}")
                finally:
                    await session.close()
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * (0.5 + random.random())):  # noqa: S311
                    await stop.wait()
            delay = min(delay * 2, box.backoff_max)
        if self._health.set(self.component(box), "stopped"):
            log.info("email.mailbox_stopped")

    async def _serve(self, box: MailboxSettings, session: ImapSession, stop: asyncio.Event) -> None:
        self._up(box)
        while not stop.is_set():
            await self._drain(box, session)
            if stop.is_set():
                return
            await session.wait_for_news(stop)

    def _up(self, box: MailboxSettings) -> None:
        if self._health.set(self.component(box), "up"):
            log.info("email.mailbox_up", mailbox=box.name)

    def _down(self, box: MailboxSettings, reason: str, *, final: bool = False) -> None:
        if self._health.set(self.component(box), "down", reason):
            log.warning("email.mailbox_down", mailbox=box.name, reason=reason, retrying=not final)

    async def _load_cursor(self, box: MailboxSettings) -> _Cursor | None:
        text = await self._cursors.get(cursor_key(box.name))
        if not text:
            return None
        try:
            data = json.loads(text)
            return _Cursor(int(data["uidvalidity"]), int(data["last_uid"]))
        except (ValueError, KeyError, TypeError):
            log.warning("email.cursor_unreadable", mailbox=box.name)
            return None

    async def _save_cursor(self, box: MailboxSettings, cursor: _Cursor) -> None:
        value = json.dumps({"uidvalidity": cursor.uidvalidity, "last_uid": cursor.last_uid})
        await self._cursors.set(cursor_key(box.name), value)

    async def _drain(self, box: MailboxSettings, session: ImapSession) -> int:
        """Take everything new, batch by batch, until a search finds nothing more."""
        taken = 0
        cursor = await self._load_cursor(box)
        if cursor is None or cursor.uidvalidity != session.uidvalidity:
            if cursor is not None:
                log.warning(
                    "email.uidvalidity_changed",
                    mailbox=box.name,
                    was=cursor.uidvalidity,
                    now=session.uidvalidity,
                )
            # rescan: rely on the keyword (or on the folder, when taken mail is moved away)
            criteria = ("ALL",) if box.after.startswith("move:") else ("UNKEYWORD", KEYWORD)
            uids = await session.search(*criteria)
            cursor = _Cursor(session.uidvalidity, 0)
            floor = max(session.uidnext - 1, 0)
            taken += await self._take_all(box, session, uids, cursor)
            cursor.last_uid = max(cursor.last_uid, floor)
            await self._save_cursor(box, cursor)
        # mail already flagged is taken: a batch that failed half way confirmed some mails
        # past the one it stopped at, and those are not published again
        unflagged = () if box.after.startswith("move:") else ("UNKEYWORD", KEYWORD)
        while True:
            found = await session.search("UID", f"{cursor.last_uid + 1}:*", *unflagged)
            uids = [u for u in found if u > cursor.last_uid]  # "n:*" always names the last
            if not uids:
                return taken
            taken += await self._take_all(box, session, uids, cursor)

    async def _take_all(
        self, box: MailboxSettings, session: ImapSession, uids: list[int], cursor: _Cursor
    ) -> int:
        """Take ``uids`` batch by batch, each parsed in the pool while the one before it is
        published and flagged: both cores parse while the loop talks to the broker. At
        most two batches' bodies are held at once (``_batches`` bounds each)."""
        taken = 0
        ahead: tuple[list[int], asyncio.Task[list[_Mail]]] | None = None
        try:
            async for batch, sizes in self._batches(box, session, uids):
                limit = self._settings.max_message_bytes
                too_large = {uid: size for uid, size in sizes.items() if size > limit}
                fetched = await session.fetch([u for u in batch if u not in too_large])
                # a mail past max_message_bytes is never held whole: its head is enough
                # for a stand-in that keeps sender, Subject and Message-ID (issue 13)
                fetched += await session.fetch(sorted(too_large), first=SCAN_HEAD)
                fetched.sort(key=lambda item: item[0])
                if len(fetched) < len(batch):
                    log.info("email.vanished", mailbox=box.name, missing=len(batch) - len(fetched))
                parsing = asyncio.create_task(
                    self._parse_batch(box, session.uidvalidity, fetched, too_large)
                )
                del fetched  # the raw bodies live on in the parse task only
                previous, ahead = ahead, (batch, parsing)
                if previous is not None:
                    taken += await self._take_batch(box, session, *previous, cursor)
            if ahead is not None:
                previous, ahead = ahead, None
                taken += await self._take_batch(box, session, *previous, cursor)
        finally:
            if ahead is not None:
                # a batch before it failed (or we are cancelled): this one is taken next pass
                ahead[1].cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ahead[1]
        return taken

    async def _batches(
        self, box: MailboxSettings, session: ImapSession, uids: list[int]
    ) -> AsyncIterator[tuple[list[int], dict[int, int]]]:
        """Batches of ``batch_size`` mails and at most ``BATCH_BYTES`` of bodies (a single
        larger mail goes alone), so memory stays bounded whatever waits."""
        for start in range(0, len(uids), box.batch_size):
            candidates = uids[start : start + box.batch_size]
            sizes = await session.sizes(candidates)
            batch: list[int] = []
            held = 0
            for uid in candidates:
                size = min(sizes.get(uid, 0), self._settings.max_message_bytes)
                if batch and held + size > BATCH_BYTES:
                    yield batch, {u: sizes.get(u, 0) for u in batch}
                    batch, held = [], 0
                batch.append(uid)
                held += size
            if batch:
                yield batch, {u: sizes.get(u, 0) for u in batch}

    async def _take_batch(
        self,
        box: MailboxSettings,
        session: ImapSession,
        uids: list[int],
        parsing: "asyncio.Task[list[_Mail]]",
        cursor: _Cursor,
    ) -> int:
        """Record one parsed batch's ids in one transaction, publish the new mails
        concurrently, then flag in one ``UID STORE`` what the broker confirmed (and the
        copies) and move the cursor once.

        When a publish fails, the mails confirmed are still
        flagged, the failed ones are forgotten and left unflagged, the cursor stops just
        before the first of them, and the first error is raised."""
        mails = await parsing
        done, submitted, failure = await self._submit_batch(box, mails)
        stuck, error = failure if failure is not None else (None, None)
        if stuck is None:
            if done:
                await session.mark(done)
            cursor.last_uid = max(cursor.last_uid, uids[-1])
            await self._save_cursor(box, cursor)
            return submitted
        assert error is not None
        log.warning("email.batch_incomplete", mailbox=box.name, uid=stuck, error=repr(error))
        with contextlib.suppress(TransientError):  # best effort: what is safe is not taken again
            if done:
                await session.mark(done)
            if stuck - 1 > cursor.last_uid:
                cursor.last_uid = stuck - 1
                await self._save_cursor(box, cursor)
        raise error

    async def _parse_batch(
        self,
        box: MailboxSettings,
        uidvalidity: int,
        fetched: list[tuple[int, bytes]],
        too_large: dict[int, int],
    ) -> list[_Mail]:
        """The batch's mails in UID order, parsed concurrently in the parse pool; a mail
        that trips a limit or fails the parser becomes a ``stand_in`` that keeps what a
        bounded header scan reads (issue 13), and is taken like any other."""
        recipient = box.address or (box.username if "@" in box.username else None)

        async def one(uid: int, raw: bytes) -> _Mail:
            locator = {
                "mailbox": box.name,
                "folder": box.folder,
                "uidvalidity": uidvalidity,
                "uid": uid,
            }
            try:
                if uid in too_large:
                    limit = self._settings.max_message_bytes
                    raise ParseFailed(
                        "too_large", f"too_large: {too_large[uid]} bytes, over {limit}"
                    )
                message = await self._pool.parse(
                    raw,
                    mailbox=box.name,
                    recipient=recipient,
                    inline_max=self._settings.inline_attachment_max,
                    locator=locator,
                    trusted_authserv_ids=self._settings.trusted_authserv_ids,
                )
            except ParseFailed as exc:
                log.warning(
                    "email.parse_failed",
                    mailbox=box.name,
                    uid=uid,
                    reason=exc.reason,
                    size=len(raw),
                    error=exc.detail[:300],
                )
                message = stand_in(
                    raw,
                    mailbox=box.name,
                    recipient=recipient,
                    locator=locator,
                    reason=exc.reason,
                    detail=exc.detail,
                    size=too_large.get(uid),
                )
            if box.team:
                message.meta["address_team"] = box.team
            return _Mail(uid, f"{box.name}:{uidvalidity}:{uid}", message)

        results = await asyncio.gather(
            *(one(uid, raw) for uid, raw in fetched), return_exceptions=True
        )
        mails: list[_Mail] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the pool could not start a worker: the batch waits
            mails.append(result)
        return mails

    async def _submit_batch(
        self, box: MailboxSettings, mails: list[_Mail]
    ) -> tuple[list[int], int, tuple[int, Exception] | None]:
        """Record the batch's slots and Message-IDs (one transaction each), publish what is
        new concurrently, and undo the records of what could not be published.

        Returns the UIDs safe to flag (confirmed, or copies of a mail already taken), how
        many were published, and the first failed UID with its error."""
        if not mails:
            return [], 0, None
        new_slots = await self._seen.first_time_many(SLOT_CHANNEL, [m.slot for m in mails])
        new_ids = await self._seen.first_time_many(
            SEEN_CHANNEL, [m.message.external_id for m in mails]
        )
        done: list[int] = []
        outgoing: list[_Mail] = []
        claimed: set[str] = set()  # a Message-ID twice in one batch: the first UID owns it
        for mail in mails:
            external_id = mail.message.external_id
            mail.new_slot = mail.slot in new_slots
            mail.new_id = external_id in new_ids and external_id not in claimed
            if mail.new_id:
                claimed.add(external_id)
            if mail.new_slot and not mail.new_id:
                log.info(
                    "email.duplicate", mailbox=box.name, uid=mail.uid, message_id=mail.message.id
                )
                done.append(mail.uid)
            else:
                # new, or recorded by a run that may have died before the broker confirmed
                outgoing.append(mail)
        limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        results = await asyncio.gather(
            *(self._publish(box, mail, limit) for mail in outgoing), return_exceptions=True
        )
        failed: list[tuple[_Mail, BaseException]] = []
        for mail, result in zip(outgoing, results, strict=True):
            if result is None:
                done.append(mail.uid)
            else:
                failed.append((mail, result))
        if not failed:
            return sorted(done), len(outgoing), None
        # forget only what this attempt recorded: a slot recorded by an earlier run stays,
        # so the mail is submitted again rather than taken for a copy of itself
        with contextlib.suppress(TransientError):
            await self._seen.forget_many(
                SEEN_CHANNEL, [m.message.external_id for m, _ in failed if m.new_id]
            )
            await self._seen.forget_many(SLOT_CHANNEL, [m.slot for m, _ in failed if m.new_slot])
        mail, exc = failed[0]
        if not isinstance(exc, Exception):  # a publish cancelled on its own, not this task
            exc = TransientError(f"publish of UID {mail.uid} cancelled")
        return sorted(done), len(outgoing) - len(failed), (mail.uid, exc)

    async def _publish(self, box: MailboxSettings, mail: _Mail, limit: asyncio.Semaphore) -> None:
        """One confirmed publish under the mailbox deadline (a task of its own: the log
        context bound here stays in it)."""
        structlog.contextvars.bind_contextvars(message_id=mail.message.id)
        async with limit:
            try:
                async with asyncio.timeout(box.timeout):
                    await self._sink.submit(mail.message)
            except TimeoutError as exc:
                raise TransientError(f"publish not confirmed within {box.timeout} s") from exc
        log.info(
            "email.taken",
            mailbox=box.name,
            uid=mail.uid,
            sender=redact(mail.message.sender.address),
            again=not mail.new_id,
        )


# --- replies out ------------------------------------------------------------------------


def reply_subject(subject: str | None) -> str:
    """Exactly one ``Re:``: earlier ``Re:``/``AW:``/``Fwd:`` chains are folded into it."""
    base = _RE_PREFIX.sub("", " ".join((subject or "").split()))
    return "Re: " + base if base else "Re:"


def _bracket(message_id: str) -> str:
    return "<" + message_id.strip().strip("<>").strip() + ">"


class SmtpSender:
    """The outbound dispatcher's ``Sender`` for channel ``email``: answers in the thread."""

    channel = "email"

    def __init__(self, settings: SmtpSettings, *, message_id_domain: str | None = None) -> None:
        self._settings = settings
        self._domain = message_id_domain or settings.from_address.rpartition("@")[2]

    def build(self, reply: ReplyRequest, context: ReplyContext) -> EmailMessage:
        """The reply as a MIME message; a header that would need CR/LF is refused for good."""
        original = context.original
        thread = original.thread if original is not None else None
        parent = thread.message_id if thread is not None else None
        if parent is None and reply.in_reply_to and "@" in reply.in_reply_to:
            parent = reply.in_reply_to.strip().strip("<>")
        references = list(thread.references) if thread is not None else []
        if parent and parent not in references:
            references.append(parent)
        if len(references) > 20:  # RFC 5322 3.6.4: keep the first and the most recent
            references = [references[0], *references[-19:]]
        subject = original.subject if original is not None and original.subject else None
        msg = EmailMessage()
        try:
            msg["From"] = self._settings.from_address
            msg["To"] = formataddr((reply.to.name or "", reply.to.address))
            msg["Subject"] = reply_subject(subject or reply.subject)
            msg["Date"] = formatdate(localtime=False)
            msg["Message-ID"] = make_msgid(domain=self._domain)
            if parent:
                msg["In-Reply-To"] = _bracket(parent)
            if references:
                msg["References"] = " ".join(_bracket(r) for r in references)
            msg.set_content(reply.text)
        except (ValueError, TypeError) as exc:
            raise PermanentSendError(f"reply cannot be written as a mail: {exc}") from exc
        return msg

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        try:
            recipient = normalise_email(reply.to.address)
        except InvalidIdentity as exc:
            raise PermanentSendError(f"not an email address: {redact(reply.to.address)}") from exc
        msg = self.build(reply, context)
        message_id = str(msg["Message-ID"]).strip().strip("<>")
        started = time.monotonic()
        async with _smtp(self._settings) as client:
            try:
                async with asyncio.timeout(self._settings.timeout):
                    await client.send_message(msg, recipients=[recipient])
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = [e.code for e in exc.recipients]
                if any(code >= 500 for code in codes):
                    raise PermanentSendError(f"recipient refused: {codes}") from exc
                raise TransientError(f"recipient deferred: {codes}") from exc
            except aiosmtplib.SMTPResponseException as exc:
                if exc.code >= 500:
                    raise PermanentSendError(f"SMTP refused: {exc.code} {exc.message}") from exc
                raise TransientError(f"SMTP deferred: {exc.code} {exc.message}") from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise TransientError(f"SMTP send failed: {exc!r}") from exc
        log.info(
            "email.reply_sent",
            to=redact(recipient),
            seconds=round(time.monotonic() - started, 3),
        )
        return SendResult(external_id=message_id, thread_message_id=message_id)


@contextlib.asynccontextmanager
async def _smtp(settings: SmtpSettings) -> AsyncIterator[aiosmtplib.SMTP]:
    """A connected, authenticated SMTP client; STARTTLS is required when asked for."""
    context = _tls_context(settings.ca_file) if settings.security != "none" else None
    client = aiosmtplib.SMTP(
        hostname=settings.host,
        port=settings.port,
        use_tls=settings.security == "tls",
        start_tls=settings.security == "starttls",
        tls_context=context,
        timeout=settings.timeout,
    )
    try:
        async with asyncio.timeout(settings.timeout):
            await client.connect()
            if settings.username:
                password = settings.password.get_secret_value() if settings.password else ""
                await client.login(settings.username, password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        client.close()
        raise AuthError(f"SMTP login refused for {redact(settings.username or '')}") from exc
    except aiosmtplib.SMTPNotSupported as exc:
        client.close()
        # no STARTTLS (or no AUTH): retrying cannot help and plaintext is never an option
        raise AuthError(f"SMTP server cannot be used safely: {exc}") from exc
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        client.close()
        if settings.security == "starttls" and "STARTTLS" in str(exc):
            raise AuthError(f"SMTP server cannot be used safely: {exc}") from exc
        raise TransientError(f"SMTP connect failed: {exc!r}") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            async with asyncio.timeout(settings.timeout):
                await client.quit()
        client.close()


# --- omniroute check --------------------------------------------------------------------


async def check(
    email: EmailSettings | None, smtp: SmtpSettings | None
) -> list[tuple[str, bool, str]]:
    """Log into every mailbox and the SMTP server; ``(name, ok, why)`` for each."""
    results: list[tuple[str, bool, str]] = []
    for box in email.mailboxes if email is not None else []:
        name = "imap:" + box.name
        try:
            session = await ImapSession.open(box)
        except (AuthError, ConfigError, TransientError) as exc:
            results.append((name, False, f"{type(exc).__name__}: {exc}"))
            continue
        await session.close()
        results.append((name, True, f"logged in, {box.folder} selected"))
    if smtp is not None:
        try:
            async with _smtp(smtp):
                pass
        except (AuthError, TransientError) as exc:
            results.append(("smtp", False, f"{type(exc).__name__}: {exc}"))
        else:
            results.append(("smtp", True, "connected" + (", logged in" if smtp.username else "")))
    return results
