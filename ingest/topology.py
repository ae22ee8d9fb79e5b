"""omniroute's broker topology: the stable names of DESIGN.md and the queues' arguments.

Names only and one declaration, so that every reader of the names (connectors, routers, the
CLI, tests, benchmarks) depends on this small module, not on the publisher. RabbitMQ 3.10
has no default delivery limit for quorum queues, so ``x-delivery-limit`` is set here.
"""

from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from ingest.errors import ConfigError
from ingest.settings import BusSettings

INBOUND = "omniroute.inbound"
ROUTED = "omniroute.routed"
OUTBOUND = "omniroute.outbound"
EVENTS = "omniroute.events"
DEAD = "omniroute.dead"
EXCHANGES = (INBOUND, ROUTED, OUTBOUND, EVENTS, DEAD)

ROUTER_QUEUE = "omniroute.router"
ROUTED_QUEUE = "omniroute.routed"
OUTBOUND_QUEUE = "omniroute.outbound"
EVENTS_QUEUE = "omniroute.events"
DEAD_QUEUE = "omniroute.dead"
#: queue -> the exchange it is bound to with ``#`` (it takes everything published there)
QUEUES = {
    ROUTER_QUEUE: INBOUND,
    ROUTED_QUEUE: ROUTED,
    OUTBOUND_QUEUE: OUTBOUND,
    EVENTS_QUEUE: EVENTS,
    DEAD_QUEUE: DEAD,
}

#: header of a dead-lettered message: why it was refused
REASON_HEADER = "x-omniroute-reason"
#: header of a dead-lettered message: ``<exchange>/<routing key>`` it first came through
SOURCE_HEADER = "x-omniroute-source"


def queue_arguments(name: str, settings: BusSettings) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if settings.queue_type == "quorum":
        args["x-queue-type"] = "quorum"
    if name != DEAD_QUEUE:
        args["x-dead-letter-exchange"] = DEAD
        if settings.queue_type == "quorum":
            args["x-delivery-limit"] = settings.delivery_limit
    return args


async def declare(
    channel: AbstractChannel, settings: BusSettings
) -> tuple[dict[str, AbstractExchange], dict[str, AbstractQueue]]:
    """Declare every exchange and queue, idempotently against an existing broker; returns
    them so the caller can hold them (robust recovery restores only what is still held)."""
    exchanges: dict[str, AbstractExchange] = {}
    queues: dict[str, AbstractQueue] = {}
    try:
        for name in EXCHANGES:
            exchanges[name] = await channel.declare_exchange(
                name, aio_pika.ExchangeType.TOPIC, durable=True
            )
        for queue_name, exchange in QUEUES.items():
            queue = await channel.declare_queue(
                queue_name, durable=True, arguments=queue_arguments(queue_name, settings)
            )
            await queue.bind(exchanges[exchange], "#")
            queues[queue_name] = queue
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigError(
            f"broker topology conflicts with omniroute's ({exc}); an existing queue was "
            "declared with other arguments (bus.queue_type?): delete it or match it"
        ) from exc
    return exchanges, queues
