"""Connecting to the broker: a robust connection whose heartbeat notices a stalled broker
within two ``bus.heartbeat`` periods, refused credentials reported as such, and URLs that
never show their password in a log."""

import asyncio
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustConnection

from ingest.errors import AuthError, TransientError
from ingest.settings import BusSettings


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
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


async def connect(url: str, settings: BusSettings, name: str) -> AbstractRobustConnection:
    """Open a robust connection; refused credentials are an ``AuthError``, not a retry loop."""
    try:
        async with asyncio.timeout(settings.connect_timeout):
            return await aio_pika.connect_robust(
                with_heartbeat(url, settings.heartbeat),
                timeout=settings.connect_timeout,
                client_properties={"connection_name": name},
            )
    except aiormq.exceptions.ProbableAuthenticationError as exc:
        raise AuthError(f"broker refused the credentials in amqp_url ({redact_url(url)})") from exc
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
        raise TransientError(f"broker at {redact_url(url)} unreachable: {exc!r}") from exc
