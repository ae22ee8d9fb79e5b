"""The HTTP app that hosts the webhooks, the PBX route API, health and metrics, and the
uvicorn server that runs it inside the daemon's event loop.

Invariants:
- No body over ``http.max_body`` reaches a handler: a larger ``Content-Length`` is answered
  413 before reading, and a body streamed without one is counted and cut off at the limit
  (uvicorn itself sets no limit). A body not complete within ``http.body_timeout`` of the
  request head is answered 408 and its connection closed.
- Slow, idle and surplus connections are bounded by ``connectors.http_limits``, which
  accepts the connections in place of asyncio's ``create_server``.
- Request logs carry the path, never the query string (caller numbers travel there);
  uvicorn's access log is off.
- The daemon owns the signals: the embedded uvicorn never installs handlers, and it stops
  when the daemon's ``stop`` event is set (uvicorn's ``should_exit``).
"""

import asyncio
import contextlib
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

import structlog
import uvicorn
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from connectors.http_limits import ConnectionTable, GuardedH11Protocol, Listener, fit_descriptors
from connectors.settings import HttpSettings
from ingest.errors import ConfigError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.spool import SpooledSink

log = structlog.get_logger("omniroute.http")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit; answered 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class BodyTimeout(HTTPException):
    """Raised from ``receive`` once the body is overdue; answered 408, connection closed."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            408, f"request body not received within {timeout:g} s", {"Connection": "close"}
        )


class GuardMiddleware:
    """Bounds request bodies in size (413) and time (408), and counts responses per
    endpoint and status.

    The endpoint label is the route's path, or ``unmatched``: a stranger's random paths
    never become label values.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body: int,
        body_timeout: float,
        metrics: Metrics,
        paths: frozenset[str],
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        endpoint = path if path in self.paths else "unmatched"
        started = time.perf_counter()
        status = 0
        limit = self.max_body

        async def counted_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        declared = _content_length(scope)
        if declared is not None and (declared < 0 or declared > limit):
            code = 413 if declared > limit else 400
            await _plain(counted_send, code, f"request body over {limit} bytes")
        else:
            seen = 0
            complete = False
            deadline = asyncio.get_running_loop().time() + self.body_timeout

            async def limited_receive() -> Message:
                nonlocal seen, complete
                if complete:  # past the body: a wait for the disconnect, not for bytes
                    return await receive()
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise BodyTimeout(self.body_timeout) from None
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise BodyTooLarge(limit)
                    complete = not message.get("more_body", False)
                return message

            try:
                await self.app(scope, limited_receive, counted_send)
            except (BodyTooLarge, BodyTimeout) as exc:
                if status:
                    raise
                await _plain(counted_send, exc.status_code, exc.detail)
        self.metrics.webhook_responses.labels(endpoint, str(status or 500)).inc()
        log.debug(
            "http.request",
            method=scope.get("method"),
            path=endpoint,
            status=status,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )


#: answers a request itself (True) or leaves it to the app (False, nothing sent)
FastPath = Callable[[Scope, Receive, Send], Awaitable[bool]]


class FastPaths:
    """Offers each request to the fast paths before the app: a hot endpoint can skip the
    framework's per-request work (see ``connectors.pbx.routes``)."""

    def __init__(self, app: ASGIApp, *, paths: Sequence[FastPath]) -> None:
        self.app = app
        self.paths = tuple(paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for path in self.paths:
                if await path(scope, receive, send):
                    return
        await self.app(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


async def _plain(send: Send, status: int, text: str) -> None:
    body = ('{"detail":"%s"}' % text).encode()  # noqa: UP031 -- the text is ours, no quotes
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def build_app(
    *,
    health: Health,
    metrics: Metrics,
    http: HttpSettings,
    routers: Sequence[APIRouter] = (),
    fast_paths: Sequence[FastPath] = (),
    spool: SpooledSink | None = None,
    title: str = "omniroute",
) -> FastAPI:
    """The ASGI app: health, readiness and metrics, plus the channel routers handed in (and
    their fast paths, inside the body limit and the response counting)."""
    app = FastAPI(
        title=title,
        summary="Omnichannel ingestion and routing: webhooks, caller-ID routing, health",
        docs_url=None,
        redoc_url=None,
    )

    @app.get("/healthz", tags=["operations"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Ready for traffic: broker, directory and every required component up",
        responses={503: {"description": "Not ready; ``problems`` says why"}},
    )
    async def readyz() -> JSONResponse:
        ready, problems = health.ready()
        body: dict[str, object] = {
            "ready": ready,
            "problems": problems,
            "components": health.snapshot(),
        }
        if spool is not None:
            body["spool_depth"] = spool.depth
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def metrics_endpoint() -> Response:
        return Response(await metrics.scrape(), media_type=metrics.content_type)

    for router in routers:
        app.include_router(router)
    if fast_paths:
        app.add_middleware(FastPaths, paths=fast_paths)
    app.add_middleware(  # added last: outside the fast paths
        GuardMiddleware,
        max_body=http.max_body,
        body_timeout=http.body_timeout,
        metrics=metrics,
        paths=frozenset(_paths([*app.routes, *(r for router in routers for r in router.routes)])),
    )
    return app


def _paths(routes: Sequence[BaseRoute]) -> Iterator[str]:
    for route in routes:
        if isinstance(route, Route):
            yield route.path


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers and without its ``create_server``: connections
    come from our ``Listener`` (see ``connectors.http_limits`` for why), on one socket."""

    def __init__(
        self,
        config: uvicorn.Config,
        listening: asyncio.Event,
        settings: HttpSettings,
        table: ConnectionTable,
    ) -> None:
        super().__init__(config)
        self._listening = listening
        self._settings = settings
        self._table = table
        self._listener: Listener | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the daemon owns SIGTERM/SIGINT and sets our stop event

    def _protocol(self, reserved: bool) -> GuardedH11Protocol:
        return GuardedH11Protocol(
            self.config,
            self.server_state,
            self.lifespan.state,
            table=self._table,
            header_timeout=self._settings.header_timeout,
            body_timeout=self._settings.body_timeout,
            reserved=reserved,
        )

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()  # lifespan "off": nothing to run, nothing to fail
        if sockets is None or len(sockets) != 1:
            raise RuntimeError("the embedded server serves exactly one bound socket")
        self.servers = []  # uvicorn's shutdown closes these; ours is the listener
        self._listener = Listener(sockets[0], self._table, self._protocol)
        self._listener.start()
        self.started = True
        self._listening.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._listener is not None:
            await self._listener.aclose()  # stop accepting before the socket closes
        await super().shutdown(sockets=sockets)


class HttpServer:
    """Runs the app on uvicorn in the current event loop until ``stop`` is set.

    ``started`` is set once the port listens; ``port`` is the bound port (useful with
    ``http.port = 0``). Open requests get ``shutdown_timeout`` seconds to finish.
    ``connections`` counts the open connections (``connectors.http_limits``).
    """

    name = "http"

    def __init__(
        self, app: ASGIApp, settings: HttpSettings, *, shutdown_timeout: float = 10.0
    ) -> None:
        self._settings = settings
        self._shutdown_timeout = shutdown_timeout
        self._config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            lifespan="off",
            http="h11",  # the protocol our deadlines extend, even where httptools is installed
            ws="none",  # no WebSockets: an upgraded connection would leave our accounting
            log_config=None,
            access_log=False,  # its lines carry query strings, i.e. caller numbers
            server_header=False,
            timeout_graceful_shutdown=int(shutdown_timeout),
        )
        self.started = asyncio.Event()
        self._socket: socket.socket | None = None
        self.connections = ConnectionTable(*self._fit(settings))

    @staticmethod
    def _fit(settings: HttpSettings) -> tuple[int, int]:
        """The connection limits, lowered (once, with a warning) to fit the descriptors."""
        nofile, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        wanted = (settings.max_connections, settings.reserved_connections)
        fitted = fit_descriptors(*wanted, nofile)  # RLIM_INFINITY is -1: no limit
        if fitted != wanted:
            log.warning(
                "http.connections_lowered",
                max_connections=fitted[0],
                reserved_connections=fitted[1],
                configured=list(wanted),
                nofile=nofile,
            )
        return fitted

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("the HTTP server is not bound yet")
        port: int = self._socket.getsockname()[1]
        return port

    def _bind(self) -> socket.socket:
        host = self._settings.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            listening = socket.create_server(
                (host, self._settings.port), family=family, backlog=2048
            )
        except OSError as exc:
            raise ConfigError(
                f"http: cannot listen on {host}:{self._settings.port}: {exc.strerror}"
            ) from exc
        # create_server leaves the protocol number 0, and asyncio sets TCP_NODELAY only on
        # sockets that say IPPROTO_TCP: without it, a response written as headers then body
        # waited for the client's delayed ACK, 40 ms on every keep-alive request. Re-wrapped,
        # the descriptor reports its protocol, and so do the connections it accepts.
        return socket.socket(fileno=listening.detach())

    async def run(self, stop: asyncio.Event) -> None:
        self._socket = self._bind()
        server = _EmbeddedServer(self._config, self.started, self._settings, self.connections)
        serving = asyncio.create_task(server.serve(sockets=[self._socket]), name="uvicorn")
        stopping = asyncio.create_task(stop.wait(), name="http-stop")
        listening = asyncio.create_task(self.started.wait(), name="http-started")
        try:
            await asyncio.wait({serving, stopping, listening}, return_when=asyncio.FIRST_COMPLETED)
            if self.started.is_set():
                log.info("http.listening", host=self._settings.host, port=self.port)
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
            stopping.cancel()
            server.should_exit = True
            try:
                async with asyncio.timeout(self._shutdown_timeout + 2):
                    await asyncio.shield(serving)
            except TimeoutError:
                server.force_exit = True
                await serving
            finally:
                self._socket.close()
                log.info("http.stopped")
