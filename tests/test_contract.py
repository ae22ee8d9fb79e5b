"""The published contract (issue 17, item 14): ``omniroute schema`` and ``omniroute schema
--asyncapi`` say what omniroute really sends and takes, and a ticket system's tools can read
them: each JSON Schema is a proper, identifiable 2020-12 schema that the messages omniroute
builds satisfy, and the AsyncAPI 3.0 document passes the official AsyncAPI JSON Schema and
names every exchange, queue and message type."""

import copy
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import jsonschema_rs
import pytest
from pydantic import BaseModel, ValidationError

from config.cli import main
from ingest.asyncapi import DEAD_LETTER, LANES, document
from ingest.consumers import dead_letter_reason
from ingest.schema import (
    JSON_SCHEMA_DIALECT,
    SCHEMAS,
    AgentReplied,
    AgentStatus,
    AssignmentAccepted,
    AssignmentClosed,
    AssignmentDeclined,
    CustomerRef,
    CustomerUnstick,
    Identity,
    InboundMessage,
    OutboundFailed,
    OutboundSent,
    ReasonName,
    ReplyRequest,
    Route,
    RoutedMessage,
    SlaBreached,
    json_schemas,
)
from ingest.topology import EXCHANGES, OUTBOUND_QUEUE, QUEUES
from tests.support.asyncapi_specs import NpmMissing, official_schema

ROOT = Path(__file__).resolve().parent.parent
AT = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
PHONE = Identity(kind="phone", address="+905321112233")
INBOUND = InboundMessage(
    channel="email",
    external_id="<m1@example.com>",
    sender=Identity(kind="email", address="ayse@example.com", name="Ayşe"),
    subject="Fatura",
    text="Merhaba",
)
#: one message of every type, as omniroute or a ticket system builds it
SAMPLES: dict[str, BaseModel] = {
    "omniroute.inbound.v1": INBOUND,
    "omniroute.routed.v1": RoutedMessage(
        message=INBOUND,
        customer=CustomerRef(id="c-1001", name="Ayşe", team="billing"),
        route=Route(kind="agent", target="ana", reason="last_agent", fallback_team="billing"),
    ),
    "omniroute.reply.v1": ReplyRequest(id="r-1", channel="sms", agent_id="ana", to=PHONE, text="x"),
    "omniroute.event.agent.replied.v1": AgentReplied(agent_id="ana", channel="sms", identity=PHONE),
    "omniroute.event.agent.status.v1": AgentStatus(agent_id="ana", status="away", until=AT),
    "omniroute.event.assignment.accepted.v1": AssignmentAccepted(message_id="m", agent_id="ana"),
    "omniroute.event.assignment.declined.v1": AssignmentDeclined(
        message_id="m", agent_id="ana", reason="on leave"
    ),
    "omniroute.event.assignment.closed.v1": AssignmentClosed(message_id="m", agent_id="ana"),
    "omniroute.event.customer.unstick.v1": CustomerUnstick(customer_id="acme", reason="moved"),
    "omniroute.event.outbound.sent.v1": OutboundSent(
        request_id="r-1", channel="sms", agent_id="ana", external_id="SM1"
    ),
    "omniroute.event.outbound.failed.v1": OutboundFailed(
        request_id="r-1", channel="sms", reason="outside_session_window"
    ),
    "omniroute.event.sla.breached.v1": SlaBreached(
        message_id="m", team="billing", due_at=AT, level=1, escalated_to="team.supervisors"
    ),
}
EVENTS = sorted(name for name in SCHEMAS if name.startswith("omniroute.event."))
REPLY = {"id": "r-1", "agent_id": "ana", "to": {"kind": "phone", "address": "+1"}, "text": "x"}


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    return json_schemas()


@pytest.fixture(scope="module")
def asyncapi() -> dict[str, Any]:
    return document()


@pytest.fixture(scope="module")
def official() -> dict[str, Any]:
    try:
        path = official_schema("3.0.0")
    except NpmMissing as exc:
        pytest.skip(str(exc))
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def test_every_schema_names_its_dialect_and_a_stable_id(schemas: dict[str, dict[str, Any]]):
    """A consumer's validator must know the dialect, and a schema registry needs a fixed id."""
    assert set(schemas) == set(SCHEMAS)
    for name, schema in schemas.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"urn:omniroute:schema:{name}"
        jsonschema_rs.meta.validate(schema)  # a valid 2020-12 schema
    assert len({s["$id"] for s in schemas.values()}) == len(schemas)


def test_what_omniroute_builds_satisfies_its_published_schema(
    schemas: dict[str, dict[str, Any]],
):
    """The schema is worth publishing only if real messages pass it, as JSON on the wire."""
    assert set(SAMPLES) == set(SCHEMAS), "a new message type needs a sample here"
    for name, model in SAMPLES.items():
        jsonschema_rs.validate(schemas[name], json.loads(model.model_dump_json()))


@pytest.mark.parametrize("name", EVENTS)
def test_an_event_requires_its_type(name: str, schemas: dict[str, dict[str, Any]]):
    """Consumers tell events apart by ``type``; omniroute refuses one without it, so the
    schema must say so, while Python callers keep the default."""
    schema = schemas[name]
    assert "type" in schema["required"]
    kind = schema["properties"]["type"]["const"]
    assert name == f"omniroute.event.{kind}.v1"
    assert LANES[name].keys == (kind,), "an event's routing key is its type"
    wire = json.loads(SAMPLES[name].model_dump_json())
    assert wire["type"] == kind == SAMPLES[name].type  # type: ignore[attr-defined]
    del wire["type"]
    assert not jsonschema_rs.is_valid(schema, wire)


def test_a_reply_request_for_voice_is_refused_with_its_reason(
    schemas: dict[str, dict[str, Any]],
):
    """A call is not answered with a message: say so at validation, not as 'no sender'."""
    with pytest.raises(ValidationError) as caught:
        ReplyRequest.model_validate({**REPLY, "channel": "voice"})
    assert caught.value.errors()[0]["type"] == "reply_channel"
    reason = dead_letter_reason(caught.value, OUTBOUND_QUEUE)
    assert reason.startswith("schema violation: 1 error(s), first at channel: voice cannot")
    assert "sms or whatsapp" in reason
    schema = schemas["omniroute.reply.v1"]
    assert schema["properties"]["channel"]["enum"] == ["email", "sms", "twitter", "whatsapp"]
    assert not jsonschema_rs.is_valid(schema, {**REPLY, "channel": "voice"})
    for channel in ("email", "sms", "twitter", "whatsapp"):  # valid before, valid now
        assert ReplyRequest.model_validate({**REPLY, "channel": channel}).channel == channel
        assert jsonschema_rs.is_valid(schema, {**REPLY, "channel": channel})
    with pytest.raises(ValidationError, match="Input should be 'email', 'sms', 'twitter'"):
        ReplyRequest.model_validate({**REPLY, "channel": "fax"})


def test_route_reason_is_an_enum_of_every_reason(schemas: dict[str, dict[str, Any]]):
    """A ticket system switching on the reason must see every value omniroute can send."""
    defs = schemas["omniroute.routed.v1"]["$defs"]
    every = list(get_args(ReasonName))
    assert {"bounce", "topic", "unverified_sender", "escalated"} <= set(every)
    assert defs["Route"]["properties"]["reason"]["enum"] == every
    assert defs["PreviousRoute"]["properties"]["reason"]["enum"] == every


def test_asyncapi_document_passes_the_official_schema(
    asyncapi: dict[str, Any], official: dict[str, Any]
):
    """What AsyncAPI tools check first; a broken copy must fail, or the check proves nothing."""
    validator = jsonschema_rs.validator_for(official)
    errors = [f"{e.instance_path}: {e.message[:200]}" for e in validator.iter_errors(asyncapi)]
    assert errors == []
    broken = copy.deepcopy(asyncapi)
    broken["operations"]["send.inbound"]["action"] = "publish"  # AsyncAPI 2's word
    assert not validator.is_valid(broken)


def test_asyncapi_names_every_exchange_queue_and_message_type(asyncapi: dict[str, Any]):
    """A new exchange, queue or message type with no entry in the contract fails here."""
    amqp = [c["bindings"]["amqp"] for c in asyncapi["channels"].values()]
    assert {b["exchange"]["name"] for b in amqp if b["is"] == "routingKey"} == set(EXCHANGES)
    assert all(
        b["exchange"]["type"] == "topic" and b["exchange"]["durable"]
        for b in amqp
        if "exchange" in b
    )
    assert {b["queue"]["name"] for b in amqp if b["is"] == "queue"} == set(QUEUES)
    messages = asyncapi["components"]["messages"]
    assert set(messages) == {*SCHEMAS, DEAD_LETTER}
    used = {
        ref["$ref"].rpartition("/")[2]
        for channel in asyncapi["channels"].values()
        for ref in channel["messages"].values()
    }
    assert used == set(messages)
    for name in SCHEMAS:
        assert messages[name]["bindings"]["amqp"]["messageType"] == name  # the AMQP type
        payload = _resolve(asyncapi, messages[name]["payload"]["$ref"])
        assert payload["schema"]["title"] == SCHEMAS[name].__name__


def test_asyncapi_operations_are_omniroutes_own(asyncapi: dict[str, Any]):
    """send: omniroute publishes there; receive: it consumes that queue."""
    ops = asyncapi["operations"]
    sent = {
        _resolve(asyncapi, o["channel"]["$ref"])["address"]
        for o in ops.values()
        if o["action"] == "send"
    }
    assert {"{channel}", "team.{team_id}", "agent.{agent_id}", "triage", "outbound.sent"} <= sent
    assert "agent.replied" not in sent  # a ticket system's news, never omniroute's
    received = {
        _resolve(asyncapi, o["channel"]["$ref"])["address"]
        for o in ops.values()
        if o["action"] == "receive"
    }
    assert received == {
        "omniroute.router",
        "omniroute.outbound",
        "omniroute.events",
        "omniroute.dead",
    }
    for op in ops.values():
        binding = op["bindings"]["amqp"]
        assert binding["deliveryMode"] == 2 if op["action"] == "send" else binding["ack"]


def test_every_reference_and_parameter_in_the_asyncapi_document_resolves(
    asyncapi: dict[str, Any],
):
    """AsyncAPI parsers resolve ``#/…`` against the whole document (not a schema's ``$id``):
    a dangling one stops them, though the official JSON Schema does not see it."""
    refs = list(_refs(asyncapi))
    assert len(refs) > 50
    for ref in refs:
        _resolve(asyncapi, ref)
    for channel in asyncapi["channels"].values():
        named = set(re.findall(r"{(\w+)}", channel["address"]))
        assert named == set(channel.get("parameters", {}))


def test_asyncapi_payload_schemas_validate_real_messages(asyncapi: dict[str, Any]):
    """The copies inside the document, their references re-pointed, still work as schemas."""
    for name, model in SAMPLES.items():
        root = {
            "$schema": JSON_SCHEMA_DIALECT,
            "$ref": f"#/components/schemas/{name}/schema",
            "components": asyncapi["components"],
        }
        jsonschema_rs.validate(root, json.loads(model.model_dump_json()))
    voice = {
        "$schema": JSON_SCHEMA_DIALECT,
        "$ref": "#/components/schemas/omniroute.reply.v1/schema",
        "components": asyncapi["components"],
    }
    assert not jsonschema_rs.is_valid(voice, {**REPLY, "channel": "voice"})


def test_omniroute_schema_asyncapi_prints_the_document(
    asyncapi: dict[str, Any], capsys: pytest.CaptureFixture[str]
):
    """The command the README points ticket-system developers to."""
    assert main(["schema", "--asyncapi"]) == 0
    assert json.loads(capsys.readouterr().out) == asyncapi
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schemas()


def test_readme_names_every_message_type():
    """The README's contract section is where a new reader looks for the AMQP ``type``."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The message contract", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in SCHEMAS if f"`{name}`" not in section]
    assert missing == []
    for prop in ("content_type", "message_id", "delivery_mode", "`type`", "--asyncapi"):
        assert prop in section


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict), ref
        assert part in node, f"{ref}: no {part!r}"
        node = node[part]
    return node
