"""The message contract as an AsyncAPI 3.0 document, for ``omniroute schema --asyncapi``.

Sole purpose: say in one machine-readable place what README's "The message contract" says
in prose. Channels are the exchanges with their routing keys (where a message is published)
and the queues bound to them (where it is consumed); operations are omniroute's own, seen
from omniroute (``send``: it publishes, ``receive``: it consumes); each message's payload is
its JSON Schema from ``ingest.schema.json_schemas``, unchanged (draft 2020-12, so in a Multi
Format Schema Object). ``LANES`` is written by hand on purpose: a message type added to
``SCHEMAS`` without a line here is missing from the document, and tests/test_contract.py
says so.
"""

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal, get_args

from ingest.schema import (
    JSON_SCHEMA_DIALECT,
    SCHEMAS,
    Channel,
    ReplyChannelName,
    json_schemas,
    schema_id,
)
from ingest.topology import (
    DEAD,
    DEAD_QUEUE,
    EVENTS,
    EVENTS_QUEUE,
    INBOUND,
    OUTBOUND,
    OUTBOUND_QUEUE,
    QUEUES,
    REASON_HEADER,
    ROUTED,
    ROUTER_QUEUE,
    SOURCE_HEADER,
)

ASYNCAPI_VERSION = "3.0.0"
DOCUMENT_ID = "urn:omniroute:asyncapi"
#: the AMQP bindings' version (AsyncAPI bindings, amqp 0.3.0)
AMQP_BINDING = "0.3.0"
#: how a payload's schema is written: JSON Schema 2020-12, which AsyncAPI 3.0 names no format for
SCHEMA_FORMAT = "application/schema+json;version=draft-2020-12"
#: the message id of a dead letter (its body is whatever was refused)
DEAD_LETTER = "omniroute.dead"

Publisher = Literal["omniroute", "ticket system", "both"]


@dataclass(frozen=True)
class Lane:
    """Where one message type travels: its exchange, its routing keys (``{name}`` a
    parameter), who publishes it, and what it is for."""

    exchange: str
    keys: tuple[str, ...]
    publisher: Publisher
    summary: str


def _event(type_: str, publisher: Publisher, summary: str) -> Lane:
    return Lane(EVENTS, (type_,), publisher, summary)


#: every message type of ``ingest.schema.SCHEMAS``, by its versioned name
LANES: dict[str, Lane] = {
    "omniroute.inbound.v1": Lane(
        INBOUND,
        ("{channel}",),
        "omniroute",
        "What a customer sent, normalised; the connectors publish it, the router consumes it.",
    ),
    "omniroute.routed.v1": Lane(
        ROUTED,
        ("team.{team_id}", "agent.{agent_id}", "triage"),
        "omniroute",
        "A message with its customer and its route: what ticket systems consume.",
    ),
    "omniroute.reply.v1": Lane(
        OUTBOUND,
        ("{reply_channel}",),
        "both",
        "A ticket system asks omniroute to answer a customer (omniroute's acknowledgements "
        "go the same way); the outcome comes back as outbound.sent or outbound.failed.",
    ),
    "omniroute.event.agent.replied.v1": _event(
        "agent.replied", "ticket system", "An agent answered a customer outside omniroute."
    ),
    "omniroute.event.agent.status.v1": _event(
        "agent.status",
        "both",
        "An agent's presence (ticket systems, and `omniroute agent status`).",
    ),
    "omniroute.event.assignment.accepted.v1": _event(
        "assignment.accepted", "ticket system", "The agent took the message offered to them."
    ),
    "omniroute.event.assignment.declined.v1": _event(
        "assignment.declined", "ticket system", "The agent will not take it: routed again."
    ),
    "omniroute.event.assignment.closed.v1": _event(
        "assignment.closed", "ticket system", "The agent is done with it without a reply."
    ),
    "omniroute.event.customer.unstick.v1": _event(
        "customer.unstick",
        "both",
        "Forget the customer's last agent: the next message goes to their team "
        "(ticket systems, and `omniroute customer unstick`).",
    ),
    "omniroute.event.outbound.sent.v1": _event(
        "outbound.sent", "omniroute", "A reply request was sent on its channel."
    ),
    "omniroute.event.outbound.failed.v1": _event(
        "outbound.failed", "omniroute", "A reply request could not be sent, and why."
    ),
    "omniroute.event.sla.breached.v1": _event(
        "sla.breached", "omniroute", "A message had no answer within its first-response time."
    ),
}

#: what each parameter of a routing key means
PARAMETERS: dict[str, dict[str, Any]] = {
    "channel": {
        "enum": list(get_args(Channel)),
        "description": "the channel the message came in on",
    },
    "team_id": {"description": "the team's id in the directory", "examples": ["billing"]},
    "agent_id": {"description": "the agent's id in the directory", "examples": ["ana"]},
    "reply_channel": {
        "description": "any key: by convention the reply's channel "
        f"({', '.join(get_args(ReplyChannelName))})",
        "examples": list(get_args(ReplyChannelName)),
    },
    "original_key": {"description": "the routing key the refused message was published with"},
}

#: the queues omniroute consumes, and who in omniroute does
CONSUMERS = {
    ROUTER_QUEUE: "the router decides each inbound message and publishes it routed",
    OUTBOUND_QUEUE: "the dispatcher sends each reply request on its channel",
    EVENTS_QUEUE: "the events worker learns who answered whom and who is available",
    DEAD_QUEUE: "`omniroute dead list|show|replay|purge`, by hand",
}

PROPERTIES = (
    "Publish every message as JSON with the AMQP properties `content_type` "
    "`application/json`, `delivery_mode` 2 (persistent), `message_id` (a unique id: consumers "
    "deduplicate on it) and `type` (the message's versioned schema name, as its "
    "`bindings.amqp.messageType` says), and `user_id` (your broker user, checked by RabbitMQ) "
    "where `events.trusted_publishers` is set. Omniroute reads the body, not the properties: "
    "a body that is not JSON or breaks its schema is dead-lettered to `omniroute.dead` with "
    "the reason in the `x-omniroute-reason` header, whatever `content_type` and `type` say; "
    "a missing `message_id` or `type` is accepted; a transient message on a classic queue is "
    "lost if the broker restarts; without a trusted `user_id` an event or reply request is "
    "refused (`untrusted_publisher`) when `events.trusted_publishers` is set."
)


def document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of omniroute's broker contract."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for name, lane in LANES.items():
        for key in lane.keys:
            channel_id = _channel_id(lane.exchange, key)
            channels[channel_id] = _key_channel(lane.exchange, key, [name])
            if lane.publisher != "ticket system":
                operations[f"send.{channel_id}"] = _operation("send", channel_id, lane.summary)
    channels[_channel_id(DEAD, "{original_key}")] = _key_channel(
        DEAD, "{original_key}", [DEAD_LETTER]
    )
    operations[f"send.{_channel_id(DEAD, '{original_key}')}"] = _operation(
        "send", _channel_id(DEAD, "{original_key}"), "A message omniroute cannot process."
    )
    for queue, exchange in QUEUES.items():
        names = [n for n, lane in LANES.items() if lane.exchange == exchange]
        channels[_queue_id(queue)] = _queue_channel(queue, exchange, names or [DEAD_LETTER])
        if queue in CONSUMERS:
            operations[f"receive.{_queue_id(queue)}"] = _operation(
                "receive", _queue_id(queue), CONSUMERS[queue]
            )
    messages = {name: _message(name, LANES[name]) for name in LANES}
    messages[DEAD_LETTER] = _dead_letter()
    schemas = {name: _schema(name, body) for name, body in json_schemas().items() if name in LANES}
    schemas[DEAD_LETTER] = _schema(
        DEAD_LETTER,
        {
            "$schema": JSON_SCHEMA_DIALECT,
            "description": "the refused message's body, unchanged (it may not be JSON)",
        },
    )
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "id": DOCUMENT_ID,
        "info": {
            "title": "omniroute",
            "version": _version(),
            "description": "Omnichannel ingestion and routing on RabbitMQ: customers' "
            "messages in, routed messages out to ticket systems, reply requests and events "
            "back. Every exchange is a durable topic exchange; every queue is durable "
            "(quorum unless `bus.queue_type` says classic) and dead-letters to "
            f"`{DEAD}`. Delivery is at-least-once.\n\n{PROPERTIES}",
            "license": {"name": "GPL-3.0-or-later"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "broker": {
                "host": "localhost:5672",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "the RabbitMQ that omniroute's `amqp_url` names",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def _channel_id(exchange: str, key: str) -> str:
    """``omniroute.routed`` + ``team.{team_id}`` -> ``routed.team``."""
    words = [w for w in key.split(".") if not w.startswith("{")]
    return ".".join([exchange.removeprefix("omniroute."), *words])


def _queue_id(queue: str) -> str:
    return f"queue.{queue.removeprefix('omniroute.')}"


def _ref(*path: str) -> dict[str, str]:
    return {"$ref": "#/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in path)}


def _key_channel(exchange: str, key: str, names: list[str]) -> dict[str, Any]:
    params = [w.strip("{}") for w in key.split(".") if w.startswith("{")]
    channel: dict[str, Any] = {
        "address": key,
        "title": f"{exchange}, routing key {key}",
        "messages": {name: _ref("components", "messages", name) for name in names},
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": AMQP_BINDING,
            }
        },
    }
    if params:
        channel["parameters"] = {p: PARAMETERS[p] for p in params}
    return channel


def _queue_channel(queue: str, exchange: str, names: list[str]) -> dict[str, Any]:
    return {
        "address": queue,
        "title": f"queue {queue}",
        "description": f"bound to {exchange} with `#`: it takes everything published there",
        "messages": {name: _ref("components", "messages", name) for name in names},
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": queue,
                    "durable": True,
                    "exclusive": False,
                    "autoDelete": False,
                    "vhost": "/",
                },
                "bindingVersion": AMQP_BINDING,
            }
        },
    }


def _operation(action: str, channel_id: str, summary: str) -> dict[str, Any]:
    binding: dict[str, Any] = (
        {"deliveryMode": 2, "mandatory": True, "timestamp": True}
        if action == "send"
        else {"ack": True}
    )
    return {
        "action": action,
        "channel": _ref("channels", channel_id),
        "summary": summary,
        "bindings": {"amqp": {**binding, "bindingVersion": AMQP_BINDING}},
    }


def _message(name: str, lane: Lane) -> dict[str, Any]:
    model = SCHEMAS[name]
    return {
        "name": name,
        "title": model.__name__,
        "summary": lane.summary,
        "description": f"Published by {lane.publisher}, as JSON (`content_type` "
        f"`application/json`), persistent, with a `message_id` and AMQP `type` `{name}` (see "
        f"info.description). Its JSON Schema is `{schema_id(name)}` (`omniroute schema`).",
        "contentType": "application/json",
        "payload": _ref("components", "schemas", name),
        "bindings": {"amqp": {"messageType": name, "bindingVersion": AMQP_BINDING}},
    }


def _dead_letter() -> dict[str, Any]:
    return {
        "name": DEAD_LETTER,
        "title": "Dead letter",
        "summary": "A message that could not be processed, with the reason.",
        "description": "The original body and properties (`type` and `content_type` kept), "
        "published again with the original routing key; replayed by `omniroute dead replay`.",
        "headers": {
            "type": "object",
            "properties": {
                REASON_HEADER: {
                    "type": "string",
                    "description": "why omniroute refused it (absent when the broker itself "
                    "dead-lettered it past the queue's x-delivery-limit: see x-death)",
                },
                SOURCE_HEADER: {
                    "type": "string",
                    "description": "<exchange>/<routing key> it first came through",
                },
            },
        },
        "payload": _ref("components", "schemas", DEAD_LETTER),
    }


def _schema(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """A JSON Schema as a component: AsyncAPI parsers resolve ``#/...`` against the whole
    document, not the schema's ``$id``, so the ``$id`` goes and ``#/$defs/X`` points into the
    document (``omniroute schema`` prints the schema as it is, with its ``$id``)."""
    inner = {k: v for k, v in body.items() if k != "$id"}
    prefix = _ref("components", "schemas", name, "schema")["$ref"]
    return {"schemaFormat": SCHEMA_FORMAT, "schema": _rebase(inner, prefix)}


def _rebase(node: Any, prefix: str) -> Any:
    """``node`` with every local ``$ref`` (``#/…``) made to start at ``prefix``."""
    if isinstance(node, dict):
        return {
            k: prefix + v[1:]
            if k == "$ref" and isinstance(v, str) and v.startswith("#/")
            else _rebase(v, prefix)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rebase(v, prefix) for v in node]
    return node


def _version() -> str:
    try:
        return metadata.version("omniroute")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0"
