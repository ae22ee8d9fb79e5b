"""What a stranger's TCP connection to the HTTP port may cost (issue 13, item 3).

Sole purpose: no number of idle, slow or stalled connections stops the daemon answering.

- The whole request head must arrive within ``http.header_timeout`` of the connection
  opening or of the previous response, however slowly its bytes come (slowloris); a body
  left unread after a response, within ``http.body_timeout``. uvicorn's h11 protocol has
  neither: a fresh connection may stay silent for ever, and any byte cancels its keep-alive
  timer.
- At most ``max_connections`` connections are served for every path. A new connection past
  it closes the one that has waited longest for a request head (nginx reuses idle
  connections the same way), so a flood of idle connections cannot lock out a health
  check. If every connection is busy with a request, up to ``reserved_connections`` more
  are served for ``/healthz``, ``/readyz`` and ``/v1/route`` only (503 for the rest, and
  closed after one answer); past those a connection is closed at once.
- Both limits are lowered at start to fit the descriptor limit, so HTTP alone cannot run
  the process out of descriptors (nginx warns about the same mismatch).
- ``accept()`` runs in our own loop rather than asyncio's ``create_server``: on EMFILE,
  asyncio's ``_accept_connection`` keeps calling ``accept()`` up to ``backlog`` (2,048)
  times per wake-up, reports each failure to the loop's exception handler and schedules a
  restart for each (280,000 log lines in 25 s). A filter on the exception handler would hide
  the lines but not the spinning; our loop backs off (50 ms doubling to 1 s) and logs one
  warning when accepting starts failing and one line when it works again.
"""

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from typing import Literal, cast

import h11
import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn._types import ASGI3Application
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

log = structlog.get_logger("omniroute.http")

#: the paths a reserved connection serves: probes and the PBX's synchronous caller route
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/v1/route"})
#: descriptors left to the rest of the daemon (broker, directory, mailboxes, parse workers)
MIN_HEADROOM = 64
RETRY_FIRST, RETRY_MAX = 0.05, 1.0
#: accept(2): errors of a connection that died in the queue; the next one may be fine
_PEER_GONE = frozenset(
    {
        errno.ECONNABORTED, errno.EPROTO, errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET,
        errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH, errno.ENETDOWN, errno.EPERM,
    }
)  # fmt: skip
_TIMEOUT_REPLY = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 16\r\n"
    b"connection: close\r\n\r\nrequest too slow"
)
Admission = Literal["serve", "reserve", "refuse"]


def fit_descriptors(limit: int, reserve: int, nofile: int) -> tuple[int, int]:
    """``(max_connections, reserved_connections)`` lowered so that both, plus a quarter of
    the descriptor limit (at least 64) for the rest of the daemon, fit under it."""
    if nofile < 0:  # RLIM_INFINITY
        return limit, reserve
    budget = max(2, nofile - max(MIN_HEADROOM, nofile // 4))
    if limit + reserve <= budget:
        return limit, reserve
    reserve = min(reserve, max(1, budget // 10))
    return max(1, budget - reserve), reserve


class ConnectionTable:
    """Who holds a connection slot, and which of them wait on the client, oldest first.

    Invariant: a connection counts from ``connection_made`` until it is lost or we drop it;
    ``waiting`` is ordered by when each entered its wait, so eviction takes the oldest.
    The saturated state is logged once on entry and once when the count falls below 90 %.
    """

    def __init__(self, limit: int, reserve: int) -> None:
        self.limit = limit
        self.reserve = reserve
        self._open: set[GuardedH11Protocol] = set()
        self._waiting: dict[GuardedH11Protocol, None] = {}
        self._full_since: float | None = None
        self._counts = {"evicted": 0, "reserved": 0, "refused": 0}

    def __len__(self) -> int:
        return len(self._open)

    def admit(self) -> Admission:
        """How to treat the connection just accepted, making room by eviction if needed."""
        if len(self._open) >= self.limit:
            if self._full_since is None:
                self._full_since = time.monotonic()
                log.warning(
                    "http.connections_full", max_connections=self.limit, reserved=self.reserve
                )
            oldest = next(iter(self._waiting), None)
            if oldest is not None:
                self._counts["evicted"] += 1
                oldest.drop(reply=None)
        if len(self._open) < self.limit:
            return "serve"
        if len(self._open) < self.limit + self.reserve:
            self._counts["reserved"] += 1
            return "reserve"
        self._counts["refused"] += 1
        return "refuse"

    def add(self, conn: "GuardedH11Protocol") -> None:
        self._open.add(conn)

    def waiting(self, conn: "GuardedH11Protocol") -> None:
        self._waiting.pop(conn, None)
        if conn in self._open:
            self._waiting[conn] = None

    def busy(self, conn: "GuardedH11Protocol") -> None:
        self._waiting.pop(conn, None)

    def discard(self, conn: "GuardedH11Protocol") -> None:
        self._open.discard(conn)
        self._waiting.pop(conn, None)
        if self._full_since is not None and len(self._open) < max(1, self.limit * 9 // 10):
            log.info(
                "http.connections_normal",
                open=len(self._open),
                seconds=round(time.monotonic() - self._full_since, 1),
                **self._counts,
            )
            self._full_since = None
            self._counts = dict.fromkeys(self._counts, 0)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines while it waits on the client.

    Phases: ``head`` (no request yet, or the previous one answered: the whole head is due
    within ``header_timeout``), ``tail`` (answered, the rest of an unread body still coming:
    ``body_timeout``), or none (the app holds the request; ``GuardMiddleware`` bounds its
    body reads). A deadline is set when a phase starts and never moved by arriving bytes.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, object],
        *,
        table: ConnectionTable,
        header_timeout: float,
        body_timeout: float,
        reserved: bool,
    ) -> None:
        super().__init__(config, server_state, app_state)
        self._table = table
        self._timeouts = {"head": header_timeout, "tail": body_timeout}
        self._phase: Literal["head", "tail"] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        if reserved:
            self.app = cast(ASGI3Application, ReservedOnly(cast(ASGIApp, self.app)))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._table.add(self)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        self._table.discard(self)
        super().connection_lost(exc)

    def drop(self, *, reply: bytes | None) -> None:
        """Close now (evicted, or a deadline passed); a client that reads nothing is aborted."""
        self._set_phase(None)
        self._table.discard(self)
        transport = self.transport
        if transport.is_closing():
            return
        if reply and not transport.get_write_buffer_size():
            transport.write(reply)  # sent at once unless the client stopped reading
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def _watch(self) -> None:
        if self.transport.is_closing():
            self._set_phase(None)
            self._table.discard(self)
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            self._set_phase("head")
        elif state is h11.SEND_BODY and self.cycle is not None and self.cycle.response_complete:
            self._set_phase("tail")
        else:
            self._set_phase(None)

    def _set_phase(self, phase: Literal["head", "tail"] | None) -> None:
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is None:
            self._table.busy(self)
            return
        self._table.waiting(self)
        self._deadline = self.loop.call_later(self._timeouts[phase], self._expired)

    def _expired(self) -> None:
        self._deadline = None
        started = self._phase == "head" and bool(self.conn.trailing_data[0])
        # RFC 9110 15.5.9: 408 for a request begun but not finished; a silent one just closes
        self.drop(reply=_TIMEOUT_REPLY if started else None)


class ReservedOnly:
    """The app as a reserved connection sees it: the reserved paths, answered once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in RESERVED_PATHS:
            body = b'{"detail":"busy: only /healthz, /readyz and /v1/route are served now"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"retry-after", b"1"),
                        (b"connection", b"close"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, closing)


class Listener:
    """Accepts connections on the listening socket and admits each through the table.

    ``factory(reserved)`` makes the protocol of an admitted connection.
    """

    def __init__(
        self,
        sock: socket.socket,
        table: ConnectionTable,
        factory: Callable[[bool], asyncio.Protocol],
    ) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._table = table
        self._factory = factory
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._accept_loop(), name="http-accept")

    async def aclose(self) -> None:
        """Stop accepting; connections already open are left to the server's shutdown."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task})

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        failing_since: float | None = None
        failures = 0
        delay = RETRY_FIRST
        while True:
            # No timeout: waiting for the next connection is this task's whole job; it ends
            # when the server stops (aclose).
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    continue
                problem: str | None = errno.errorcode.get(exc.errno or 0, repr(exc))
            else:
                problem = await self._admit(loop, conn)
            if problem is None:
                if failing_since is not None:
                    log.info(
                        "http.accept_recovered",
                        failures=failures,
                        seconds=round(time.monotonic() - failing_since, 1),
                    )
                    failing_since, failures, delay = None, 0, RETRY_FIRST
                continue
            failures += 1
            if failing_since is None:
                failing_since = time.monotonic()
                log.warning("http.accept_failing", error=problem, open=len(self._table))
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _admit(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> str | None:
        """Serve, reserve or refuse one accepted connection; a bug here is reported as a
        failure to accept (logged once, backed off), never the end of accepting."""
        admission = self._table.admit()
        if admission == "refuse":
            conn.close()
            return None
        reserved = admission == "reserve"
        try:
            # Local work (a transport, connection_made): done within a loop iteration or two.
            await loop.connect_accepted_socket(lambda: self._factory(reserved), conn)
        except OSError:  # the peer left before the transport was made
            conn.close()
        except Exception as exc:  # a bug: keep accepting, say so once
            conn.close()
            return repr(exc)[:200]
        return None
