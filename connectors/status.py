"""The status page, ``GET /status`` (issue 17): what an operator looks at first.

Sole purpose: gather, for one request, the components and their state (``Health``), the
decisions per minute by channel and reason and the last decisions (``ingest.recent``),
the depths of omniroute's queues (asked of the broker, cached) and the dead letters
counted by this process (its Prometheus registry), and hand them to
``connectors.status_html`` to render.

Invariants:
- Served only with ``http.status_page = true`` (the route is not even registered
  otherwise: 404). Behind a token, compared in constant time: ``Authorization: Bearer
  <token>``, or HTTP Basic with the token as the password (what a browser can send; any
  user name). No token configured means every request is refused (401), never an open page.
- Identities are redacted by the ``Redaction`` handed in (``config`` gives the logging
  rules: redacted unless ``log.redact = false``); free text (a component's reason, a broker
  error) is scrubbed of addresses the same way.
- A request never waits long on the broker: queue depths are asked at most once per
  ``ttl`` by one task of their own, which a request waits for at most ``wait`` seconds
  (the page then shows the last depths known, with their time). In the daemon they are
  the numbers of ``/metrics`` (``from_queue_stats``: one cached question to the broker,
  on a channel of its own, serves both).
"""

import asyncio
import base64
import binascii
import hmac
import math
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry

from connectors.status_html import (
    QueueReport,
    Redaction,
    Snapshot,
    render,
)
from ingest.errors import TransientError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.queue_stats import QueueStats
from ingest.recent import RecentDecisions
from ingest.topology import QUEUES

PATH = "/status"
#: seconds between two automatic reloads of the page (``?refresh=0`` stops them)
REFRESH = 15
#: the realm the browser shows when it asks for the token
REALM = "omniroute status"

#: what asks the broker for a queue's (messages ready, consumers): ``Bus.queue_depth``
AskDepth = Callable[[str], Awaitable[tuple[int, int]]]


def from_queue_stats(stats: QueueStats, metrics: Metrics) -> AskDepth:
    """Depths as ``/metrics`` has them (``omniroute_queue_messages`` and ``_consumers``),
    brought up to date by ``stats`` (cached, single-flight, bounded by its own timeout)."""

    async def ask(queue: str) -> tuple[int, int]:
        await stats.refresh()
        labels = {"queue": queue}
        ready = metrics.registry.get_sample_value("omniroute_queue_messages", labels)
        consumers = metrics.registry.get_sample_value("omniroute_queue_consumers", labels)
        if ready is None or consumers is None:
            raise TransientError("the broker did not answer in time, or the queue is missing")
        return int(ready), int(consumers)

    return ask


class QueueDepths:
    """The depths of ``queues``, asked of the broker at most once per ``ttl`` seconds by a
    task of their own; ``get`` waits for that task at most ``wait`` seconds."""

    def __init__(
        self,
        ask: AskDepth,
        queues: Sequence[str] = tuple(QUEUES),
        *,
        scrub: Callable[[str], str],
        ttl: float = 5.0,
        wait: float = 1.0,
        bound: float = 30.0,
    ) -> None:
        self._ask = ask
        self._queues = tuple(queues)
        self._scrub = scrub
        self._ttl = ttl
        self._wait = wait
        self._bound = bound  # the whole refresh, should the bus's own timeouts not end it
        self._report = QueueReport(at=None, depths=(), problem="not asked yet")
        self._asked = -math.inf
        self._task: asyncio.Task[None] | None = None

    async def get(self) -> QueueReport:
        idle = self._task is None or self._task.done()
        if idle and time.monotonic() - self._asked >= self._ttl:
            self._asked = time.monotonic()
            self._task = asyncio.create_task(self._refresh(), name="status-queue-depths")
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=self._wait)  # never cancels it
        return self._report

    async def _refresh(self) -> None:
        depths: list[tuple[str, int, int]] = []
        try:
            async with asyncio.timeout(self._bound):
                for queue in self._queues:
                    ready, consumers = await self._ask(queue)
                    depths.append((queue, ready, consumers))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker is away or slow: the page says so
            problem = self._scrub(f"{type(exc).__name__}: {exc}")[:300]
            self._report = QueueReport(self._report.at, self._report.depths, problem)
            return
        self._report = QueueReport(time.time(), tuple(depths), None)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait({self._task})


def dead_letters(registry: CollectorRegistry) -> tuple[str, list[tuple[str, int]]]:
    """Dead letters counted by this process, from whatever counters of ``registry`` count
    them (``omniroute_dead_*``): by ``reason`` when some carry one, else by ``queue``.
    Returns the label used and the counts, largest first."""
    by: dict[str, Counter[str]] = {"reason": Counter(), "queue": Counter()}
    for family in registry.collect():
        if family.type != "counter" or not family.name.startswith("omniroute_dead"):
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            for label in ("reason", "queue"):
                if label in sample.labels:
                    by[label][sample.labels[label]] += int(sample.value)
                    break
    label = "queue" if by["queue"] and not by["reason"] else "reason"
    return label, [(k, n) for k, n in by[label].most_common() if n > 0]


def _given(authorization: str) -> bytes:
    """The token a request carries: a Bearer token, or the password of HTTP Basic."""
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value.encode()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return b""
        return decoded.partition(b":")[2]
    return b""


@dataclass(frozen=True)
class StatusSources:
    """Where the page's numbers come from; ``recent`` is None when this process does not
    run the router (its page then says so)."""

    health: Health
    metrics: Metrics
    depths: QueueDepths
    recent: RecentDecisions | None


class StatusPage:
    """``router`` serves ``GET /status``; ``close`` ends a pending broker question."""

    def __init__(self, sources: StatusSources, *, token: str | None, redaction: Redaction) -> None:
        self._sources = sources
        self._token = token.encode() if token else None
        self._redaction = redaction
        self.router = self._api_router()

    def authorised(self, authorization: str | None) -> bool:
        if self._token is None or not authorization:
            return False
        return hmac.compare_digest(_given(authorization), self._token)

    async def snapshot(self) -> Snapshot:
        s = self._sources
        ready, problems = s.health.ready()
        label, dead = dead_letters(s.metrics.registry)
        return Snapshot(
            at=time.time(),
            ready=ready,
            problems=problems,
            components=s.health.snapshot(),
            recent=s.recent,
            queues=await s.depths.get(),
            dead_by=label,
            dead=dead,
        )

    async def close(self) -> None:
        await self._sources.depths.close()

    def _api_router(self) -> APIRouter:
        router = APIRouter(tags=["operations"])

        @router.get(
            PATH,
            summary="The status page (http.status_page): components, decisions, queues",
            response_class=Response,
            responses={
                200: {"content": {"text/html": {}}},
                401: {"description": "missing or wrong token (http.status_token or api.token)"},
            },
        )
        async def status(request: Request) -> Response:
            if not self.authorised(request.headers.get("authorization")):
                refused = Response(
                    "status page: missing or wrong token\n", 401, media_type="text/plain"
                )
                refused.headers.append("WWW-Authenticate", f'Basic realm="{REALM}"')
                refused.headers.append("WWW-Authenticate", f'Bearer realm="{REALM}"')
                refused.headers["Cache-Control"] = "no-store"
                return refused
            refresh = None if request.query_params.get("refresh") == "0" else REFRESH
            nonce = secrets.token_urlsafe(16)
            body = render(await self.snapshot(), self._redaction, nonce=nonce, refresh=refresh)
            return Response(body, media_type="text/html", headers=_headers(nonce))

        return router


def _headers(nonce: str) -> dict[str, str]:
    """No script, no outside asset: the one inline style sheet carries the nonce."""
    return {
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'nonce-{nonce}'; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'"
        ),
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
    }
