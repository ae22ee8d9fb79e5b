"""One IMAP connection (aioimaplib) whose every command has a deadline.

Sole purpose: the session a mailbox worker reads through. STARTTLS is never
opportunistic: a server that does not offer it is an error before any credential is sent.
"""

import asyncio
import contextlib
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import aioimaplib

from connectors.settings import MailboxSettings
from ingest.errors import AuthError, ConfigError, TransientError
from ingest.identities import redact

#: the keyword that marks a mail as taken (with \\Seen)
KEYWORD = "$Omniroute"
_FETCH_HEAD = re.compile(rb"UID (\d+)")
_FETCH_SIZE = re.compile(rb"RFC822\.SIZE (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_UIDNEXT = re.compile(rb"\[UIDNEXT (\d+)\]")
IMAP_ERRORS = (OSError, TimeoutError, aioimaplib.AioImapException)


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_file)


def _quote(name: str) -> str:
    """An IMAP quoted string (RFC 3501 section 4.3) for folder names with spaces."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


class ImapSession:
    """A logged-in, selected IMAP connection whose every command has a deadline."""

    def __init__(self, box: MailboxSettings) -> None:
        self.box = box
        self.lost = asyncio.Event()
        self.uidvalidity = 0
        self.uidnext = 0
        self._client: Any = None
        #: one command on the wire at a time: the intake flags one batch while it fetches
        #: the next, and aioimaplib does not queue a third command behind two
        self._turn = asyncio.Lock()

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
        context = tls_context(box.ca_file) if box.security == "tls" else None
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
        except IMAP_ERRORS as exc:
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
                    tls_context(self.box.ca_file),
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
        async with self._turn:
            try:
                async with asyncio.timeout(self.box.timeout):
                    response = await command()
            except (TimeoutError, asyncio.CancelledError) as exc:
                # the command may still be on the wire (a FETCH streaming its mails):
                # nothing sent after it could be read in step, so the session ends here
                self.lost.set()
                self.abort()
                if isinstance(exc, TimeoutError):
                    raise TransientError(f"{what} failed: {exc!r}") from exc
                raise
            except IMAP_ERRORS as exc:
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
        response = await self.call(lambda: self._fetch(uid_set, f"(UID {section})"), "UID FETCH")
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

    def _fetch(self, uid_set: str, parts: str) -> Awaitable[Any]:
        """``UID FETCH`` without aioimaplib's own idle timer (``call``'s deadline bounds the
        command): the library re-arms that timer for every line and literal it reads, about
        5 % of the intake loop's time."""
        return self._client.protocol.fetch(uid_set, parts, by_uid=True, timeout=None)  # type: ignore[no-any-return]

    async def sizes(self, uids: list[int]) -> dict[int, int]:
        """``UID FETCH … (UID RFC822.SIZE)``: each mail's size, before fetching any body."""
        uid_set = ",".join(str(u) for u in uids)
        response = await self.call(lambda: self._fetch(uid_set, "(UID RFC822.SIZE)"), "UID FETCH")
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
        except IMAP_ERRORS as exc:
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
        except IMAP_ERRORS as exc:
            raise TransientError(f"leaving IDLE failed: {exc!r}") from exc

    async def close(self) -> None:
        """Log out politely within the deadline; a dead connection is simply dropped."""
        if self._client is None:
            return
        if not self.lost.is_set():
            with contextlib.suppress(*IMAP_ERRORS, TransientError):
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
