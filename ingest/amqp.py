"""AMQP plumbing under the ``Bus``: connecting (to one node or to several nodes of one
cluster, issue 18; a heartbeat that notices a stalled broker within two ``bus.heartbeat``
periods, refused credentials reported as such, URLs that never show their password in a
log), a published message's properties, and what a failed publish means."""

import asyncio
import contextlib
import logging
import random
import socket
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
import yarl
from aio_pika.abc import AbstractRobustConnection
from aio_pika.connection import make_url

from ingest.errors import AuthError, TransientError, UnroutableError
from ingest.settings import BusSettings
from ingest.settings import amqp_nodes as amqp_nodes  # there: loading settings needs no aio-pika


def amqp_heartbeat(window: int) -> int:
    """The AMQP heartbeat to ask for so that a stalled connection is noticed within
    ``2 * window`` seconds (``bus.heartbeat`` is two heartbeats of the operator's clock).

    aiormq declares a connection dead after ``3 * (h + 1)`` silent seconds, checked every
    ``max(1, h // 2)`` seconds; so ask for the largest h with
    ``3 * (h + 1) + max(1, h // 2) <= 2 * window``. The smallest h is 1 (7 s), so a window
    under ``MIN_HEARTBEAT`` cannot be kept (the settings refuse it). 0 disables heartbeats.
    """
    if window <= 0:
        return 0
    best = 1
    for h in range(1, window + 1):
        if 3 * (h + 1) + max(1, h // 2) <= 2 * window:
            best = h
    return best


def with_heartbeat(url: str, heartbeat: int) -> str:
    """Add ``heartbeat=`` to an AMQP URL unless the operator set one: a stalled connection
    must be noticed within two ``bus.heartbeat`` periods, not after the kernel's TCP
    timeout."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("heartbeat", str(amqp_heartbeat(heartbeat)))
    return urlunsplit(parts._replace(query=urlencode(query)))


def redact_url(url: str) -> str:
    """``url`` (or each node of a list) with its password shown as ``***``."""
    nodes = amqp_nodes(url)
    if len(nodes) > 1:
        return ",".join(redact_url(node) for node in nodes)
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def node_name(url: yarl.URL | str) -> str:
    """``host:port`` of a node, for logs (never the credentials)."""
    parsed = yarl.URL(str(url))
    return f"{parsed.host}:{parsed.port}"


def broker_user(url: str) -> str | None:
    """The broker user a connection to ``url`` logs in as (aiormq's PLAIN default: guest),
    or None with EXTERNAL auth, where the client certificate names it."""
    parsed = yarl.URL(amqp_nodes(url)[0])  # the nodes of a cluster share their users
    if parsed.query.get("auth", "plain").upper() != "PLAIN":
        return None
    return parsed.user or "guest"


#: what aiormq and aio-pika log about a broker outage that the ``Bus`` reports once itself
#: (``bus.connection_lost`` with the reason, ``bus.reconnected``; the daemon's
#: ``daemon.broker_unreachable``): by logger, the message templates. A cut connection logged
#: a traceback and two errors, a long outage a warning every reconnect (issue 19).
_OUTAGE_NOISE = {
    "aiormq.connection": {
        "Cancelling cause reader exited abnormally",
        "Server connection %r was stuck. No frames were received in %d seconds.",
        'Unexpected connection close from remote "%s", '
        "Connection.Close(reply_code=%r, reply_text=%r)",
        "error when creating transport: %r",
    },
    "aio_pika.robust_connection": {
        'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.',
        'Connection attempt to "%s" cancelled. Reconnecting after %r seconds.',
    },
    "aio_pika.tools": {"Callback %r error: %s: %s"},
}
#: what an outage raises; anything else (a bad CA file, a bug) is still logged in full
_OUTAGE_ERRORS = (ConnectionError, TimeoutError, socket.gaierror, aiormq.exceptions.AMQPError)


class _OutageNoise(logging.Filter):
    """Drops the libraries' own lines about an expected outage (kept, at debug level, when
    the operator asked for debug logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in _OUTAGE_NOISE.get(record.name, ()) or not _outage(record):
            return True
        if not logging.getLogger().isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _outage(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    if record.name == "aio_pika.tools":  # a channel's close callback on a connection gone
        return len(args) == 3 and args[1] == "RuntimeError" and str(args[2]).endswith("closed")
    if record.exc_info:
        return isinstance(record.exc_info[1], _OUTAGE_ERRORS)
    if record.msg == "error when creating transport: %r":
        return bool(args) and isinstance(args[0], _OUTAGE_ERRORS)
    return True


_QUIET = _OutageNoise()


def quiet_outage_noise() -> None:
    """Install the filter (idempotent): the Bus says an outage once, in one line."""
    for name in _OUTAGE_NOISE:
        logging.getLogger(name).addFilter(_QUIET)


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection over several nodes of one cluster (issue 18): when its connection
    is lost, or an attempt fails, the next attempt goes to the next node in its list.

    aio-pika's recovery (channels, consumers, the topology we hold) is unchanged: only the
    URL its reconnection loop dials moves on. Both a lost connection and a failed attempt end
    in ``_on_connection_close``; the nodes share user, vhost and parameters (the settings
    check it), so the parameters parsed from the first apply to all.
    """

    def __init__(self, nodes: Sequence[yarl.URL], **kwargs: Any) -> None:
        super().__init__(nodes[0], **kwargs)
        self._nodes = list(nodes)
        self._current = 0

    @property
    def node(self) -> str:
        """``host:port`` of the node this connection is on (or dials next)."""
        return node_name(self._nodes[self._current])

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if len(self._nodes) > 1 and not self._close_called:
            self._current = (self._current + 1) % len(self._nodes)
            self.url = self._nodes[self._current]
        await super()._on_connection_close(closing)


async def connect(url: str, settings: BusSettings, name: str) -> ClusterConnection:
    """Open a robust connection to the first node that answers, trying the nodes of
    ``url`` in an order shuffled per call (so that instances spread over a cluster); refused
    credentials are an ``AuthError``, not a retry loop; no node answering a
    ``TransientError``.

    A first attempt that fails closes its connection: left open, aio-pika's recovery goes on
    retrying it in the background for ever, and connects it, unused, once the broker
    answers (issue 19: seen with a broker that accepts TCP and never answers AMQP)."""
    quiet_outage_noise()
    nodes = [make_url(with_heartbeat(node, settings.heartbeat)) for node in amqp_nodes(url)]
    random.shuffle(nodes)  # load spreading, not security
    failures: list[str] = []
    for start in range(len(nodes)):
        connection = ClusterConnection(
            nodes[start:] + nodes[:start], client_properties={"connection_name": name}
        )
        try:
            async with asyncio.timeout(settings.connect_timeout):
                await connection.connect(timeout=settings.connect_timeout)
            return connection
        except BaseException as exc:
            await asyncio.shield(_close_quietly(connection))
            where = redact_url(str(nodes[start]))
            if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
                raise AuthError(f"broker refused the credentials in amqp_url ({where})") from exc
            if not isinstance(exc, (TimeoutError, OSError, aiormq.exceptions.AMQPError)):
                raise
            failures.append(f"broker at {where} unreachable: {exc!r}")
            if start == len(nodes) - 1:
                raise TransientError("; ".join(failures)) from exc
    raise AssertionError("no node to connect to")  # amqp_nodes never returns an empty list


async def _close_quietly(connection: AbstractRobustConnection) -> None:
    with contextlib.suppress(Exception):  # closing what never opened: nothing to report
        await connection.close()


PERSISTENT = int(aio_pika.DeliveryMode.PERSISTENT)


def message_properties(
    message_id: str | None,
    type_: str | None,
    headers: dict[str, Any] | None,
    content_type: str = "application/json",
    user_id: str | None = None,
) -> aiormq.spec.Basic.Properties:
    # aiormq's own properties, as the Bus publishes with aiormq itself (see Bus.publish_body).
    # ``user_id`` is checked by RabbitMQ against the connection's user: readers can trust it.
    return aiormq.spec.Basic.Properties(
        content_type=content_type,
        delivery_mode=PERSISTENT,
        message_id=message_id,
        message_type=type_,
        timestamp=datetime.now(UTC),
        headers=headers or {},
        user_id=user_id,
    )


def publish_failure(exc: BaseException, exchange: str, routing_key: str) -> Exception:
    """What a failed publish means to its caller: unroutable, an outage to retry, or (any
    other exception) a bug of ours, returned as it is."""
    if isinstance(exc, aiormq.exceptions.PublishError):
        return UnroutableError(f"no queue bound for {exchange} with key {routing_key!r}")
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return TransientError(f"broker refused the publish on {exchange}: {exc!r}")
    if isinstance(exc, asyncio.CancelledError):
        # aiormq fails the confirms it still waits for with CancelledError when it
        # declares a stalled connection dead: an outage, not a reason to stop
        return TransientError(f"publish to {exchange} failed: connection lost")
    if isinstance(exc, (TimeoutError, aiormq.exceptions.AMQPError, ConnectionError, RuntimeError)):
        return TransientError(f"publish to {exchange} failed: {exc!r}")
    if isinstance(exc, Exception):
        return exc
    return TransientError(f"publish to {exchange} failed: {exc!r}")


def cancelled_here() -> bool:
    """Whether the running task itself is being cancelled (not a confirm aiormq failed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
