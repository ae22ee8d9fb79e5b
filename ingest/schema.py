"""The one message schema: what every channel's input becomes and what ticket systems read.

The JSON shapes are a contract (DESIGN.md): fields may be added, never renamed. Each model
has a versioned schema name in ``SCHEMAS``; it travels as the AMQP ``type`` property, and
``json_schemas`` publishes each shape as a JSON Schema (draft 2020-12) whose ``$id`` is
``urn:omniroute:schema:<name>`` (``ingest.asyncapi`` puts them in the AsyncAPI document).
"""

import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from ingest.reasons import Reason as Reason
from ingest.reasons import ReasonName as ReasonName

Channel = Literal["email", "sms", "voice", "twitter", "whatsapp"]
#: the channels a ReplyRequest may name: every Channel but voice (a call is not answered by a
#: message; no sender exists for it)
ReplyChannelName = Literal["email", "sms", "twitter", "whatsapp"]
IdentityKindField = Literal["email", "phone", "twitter"]
RouteKind = Literal["agent", "team", "triage"]
Presence = Literal["available", "away", "offline"]


def _no_voice(value: object) -> object:
    """Refuse a voice reply with its reason, not the Literal's bare list of channels."""
    if value == "voice":
        raise PydanticCustomError(
            "reply_channel",
            "voice cannot carry a reply request (a call is not answered with a message): "
            "answer the caller on sms or whatsapp",
        )
    return value


ReplyChannel = Annotated[
    ReplyChannelName,
    BeforeValidator(_no_voice),
    Field(
        description="the channel to answer on; voice is refused (a call is not answered with "
        "a message): answer a caller on sms or whatsapp, to their number"
    ),
]

#: the JSON Schema dialect of ``json_schemas``
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def new_id() -> str:
    """A fresh omniroute message id (UUID4 text)."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class _Model(BaseModel):
    # Unknown fields from a newer publisher are kept, so a router never drops what it
    # does not understand yet.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def _type_required(schema: dict[str, Any]) -> None:
    """An event's ``type`` is what a consumer tells events apart by (``Event``'s
    discriminator): required on the wire, though Python callers may leave it to its default."""
    required = schema.setdefault("required", [])
    if "type" not in required:
        required.insert(0, "type")


class _Event(_Model):
    """An ``omniroute.events`` message: ``type`` names it and is its routing key."""

    model_config = ConfigDict(json_schema_extra=_type_required)


class Identity(_Model):
    kind: IdentityKindField
    address: str = Field(min_length=1, max_length=512)
    name: str | None = None
    aliases: list[str] = Field(
        default_factory=list,
        description="other addresses of the same sender, matched after address "
        "(an X handle beside the stable user id)",
    )


class Thread(_Model):
    message_id: str | None = Field(default=None, max_length=998)  # RFC 5322 line limit
    in_reply_to: str | None = Field(default=None, max_length=998)
    references: list[str] = Field(default_factory=list)


class Attachment(_Model):
    filename: str | None = None
    content_type: str
    size: int = Field(ge=0)
    sha256: str | None = None
    url: str | None = None
    content_b64: str | None = None
    locator: dict[str, Any] | None = None


class InboundMessage(_Model):
    """What a customer sent, on any channel, normalised."""

    id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    channel: Channel
    external_id: str = Field(min_length=1, max_length=512)
    received_at: AwareDatetime = Field(default_factory=utcnow)
    sender: Identity
    recipient: Identity | None = None
    subject: str | None = None
    text: str = ""
    thread: Thread | None = None
    attachments: list[Attachment] = Field(default_factory=list)
    meta: dict[str, Any] = Field(default_factory=dict)


class RecentContact(_Model):
    channel: str
    at: AwareDatetime
    message_id: str
    route: str


class CustomerRef(_Model):
    id: str
    name: str
    team: str | None = None
    recent: list[RecentContact] = Field(default_factory=list)


class PreviousRoute(_Model):
    """Where an earlier attempt sent the message (issue 16: offers, escalation)."""

    kind: RouteKind
    target: str | None = Field(default=None, max_length=200)
    reason: Reason


class Route(_Model):
    kind: RouteKind
    target: str | None = Field(default=None, max_length=200)
    reason: Reason
    decided_at: AwareDatetime = Field(default_factory=utcnow)
    fallback_team: str | None = Field(
        default=None, description="the team that takes over when the chosen agent does not"
    )
    steps: list[str] = Field(
        default_factory=list, description="each policy step and what it found, in order"
    )
    for_agent: str | None = Field(
        default=None, max_length=200, description="the agent a deputy stands in for"
    )
    opens_at: AwareDatetime | None = Field(
        default=None,
        description="when the team, closed now, opens next (its own time zone); the message "
        "waits for it there",
    )
    attempt: int = Field(
        default=1,
        ge=1,
        le=1000,
        description="1 for the first decision; each re-route (an offer that timed out or was "
        "declined) adds one, and the AMQP message_id becomes <id>#<attempt>",
    )
    previous: PreviousRoute | None = Field(
        default=None, description="where the attempt before this one sent the message"
    )
    respond_by: AwareDatetime | None = Field(
        default=None,
        description="when the customer's first answer is due: the team's first_response time "
        "for the channel, counted in its opening hours; unanswered by then, omniroute "
        "publishes sla.breached and routes the message again to the team's escalate_to "
        "(reason escalated)",
    )

    rule: str | None = Field(
        default=None,
        max_length=100,
        description="the [[routing.rules]] rule that decided (reason topic), else absent",
    )
    tags: list[str] = Field(
        default_factory=list,
        description="tags that [[routing.rules]] rules with a tag action added (the target "
        "is not changed by them)",
    )

    @property
    def routing_key(self) -> str:
        """``team.<id>``, ``agent.<id>`` or ``triage`` (DESIGN.md contract)."""
        if self.kind == "triage" or self.target is None:
            return "triage"
        return f"{self.kind}.{self.target}"


class RoutedMessage(_Model):
    message: InboundMessage
    customer: CustomerRef | None = None
    route: Route


class ReplyRequest(_Model):
    """A ticket system asks omniroute to answer a customer on a channel."""

    id: str = Field(min_length=1, max_length=512)
    channel: ReplyChannel
    agent_id: str = Field(min_length=1, max_length=200)
    to: Identity
    text: str
    subject: str | None = None
    in_reply_to: str | None = Field(
        default=None, description="the InboundMessage id or the channel's own id"
    )


class AgentReplied(_Event):
    type: Literal["agent.replied"] = "agent.replied"
    agent_id: str = Field(min_length=1, max_length=200)
    customer_id: str | None = Field(default=None, max_length=200)
    identity: Identity | None = None
    channel: str = Field(min_length=1, max_length=16)
    at: AwareDatetime = Field(default_factory=utcnow)
    message_id: str | None = Field(
        default=None,
        max_length=512,
        description="the Message-ID omniroute sent, owned by the agent",
    )


class AgentStatus(_Event):
    type: Literal["agent.status"] = "agent.status"
    agent_id: str = Field(min_length=1, max_length=200)
    status: Presence
    at: AwareDatetime = Field(default_factory=utcnow)
    until: AwareDatetime | None = Field(
        default=None,
        description="away or offline until then; a time in the past means back at work",
    )
    deputy: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="the agent who takes this one's customers meanwhile (overrides agents.csv)",
    )


class AssignmentAccepted(_Event):
    """A ticket system says the agent took the message offered to them: the offer's timer
    stops (an ``agent.replied`` or a reply from them to that customer counts the same)."""

    type: Literal["assignment.accepted"] = "assignment.accepted"
    message_id: str = Field(min_length=1, max_length=64)
    agent_id: str = Field(min_length=1, max_length=200)
    at: AwareDatetime = Field(default_factory=utcnow)


class AssignmentDeclined(_Event):
    """The agent will not take the message: it is routed again at once, without them."""

    type: Literal["assignment.declined"] = "assignment.declined"
    message_id: str = Field(min_length=1, max_length=64)
    agent_id: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=500)
    at: AwareDatetime = Field(default_factory=utcnow)


class AssignmentClosed(_Event):
    """A ticket system says the agent is done with a message without answering it through
    omniroute: it no longer counts towards the agent's load."""

    type: Literal["assignment.closed"] = "assignment.closed"
    message_id: str = Field(min_length=1, max_length=64)
    agent_id: str = Field(min_length=1, max_length=200)
    at: AwareDatetime = Field(default_factory=utcnow)


class CustomerUnstick(_Event):
    """Forget the customer's last agent (issue 17: ``omniroute customer unstick``, or a ticket
    system): their next message goes to their team, until an agent answers them again."""

    type: Literal["customer.unstick"] = "customer.unstick"
    customer_id: str = Field(min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=500)
    at: AwareDatetime = Field(default_factory=utcnow)


class SlaBreached(_Event):
    """Omniroute's news: a customer's message had no answer within its team's first-response
    time; ``level`` 1 is the first escalation (the message goes to the team's
    ``escalate_to``), 2 the next along the chain."""

    type: Literal["sla.breached"] = "sla.breached"
    message_id: str = Field(min_length=1, max_length=64)
    customer_id: str | None = Field(default=None, max_length=200)
    team: str = Field(max_length=200, description="the team whose first-response time ran out")
    due_at: AwareDatetime
    level: int = Field(ge=1)
    escalated_to: str | None = Field(
        default=None,
        description="the routing key the message went to (None: the chain ended, or "
        "routing.max_escalations was reached)",
    )
    at: AwareDatetime = Field(default_factory=utcnow)


class OutboundSent(_Event):
    type: Literal["outbound.sent"] = "outbound.sent"
    request_id: str
    channel: str
    agent_id: str
    external_id: str | None = None
    at: AwareDatetime = Field(default_factory=utcnow)


class OutboundFailed(_Event):
    type: Literal["outbound.failed"] = "outbound.failed"
    request_id: str
    channel: str
    agent_id: str | None = None
    reason: str
    at: AwareDatetime = Field(default_factory=utcnow)


Event = Annotated[
    AgentReplied
    | AgentStatus
    | AssignmentAccepted
    | AssignmentDeclined
    | AssignmentClosed
    | CustomerUnstick
    | OutboundSent
    | OutboundFailed
    | SlaBreached,
    Field(discriminator="type"),
]

SCHEMAS: dict[str, type[BaseModel]] = {
    "omniroute.inbound.v1": InboundMessage,
    "omniroute.routed.v1": RoutedMessage,
    "omniroute.reply.v1": ReplyRequest,
    "omniroute.event.agent.replied.v1": AgentReplied,
    "omniroute.event.agent.status.v1": AgentStatus,
    "omniroute.event.assignment.accepted.v1": AssignmentAccepted,
    "omniroute.event.assignment.declined.v1": AssignmentDeclined,
    "omniroute.event.assignment.closed.v1": AssignmentClosed,
    "omniroute.event.customer.unstick.v1": CustomerUnstick,
    "omniroute.event.outbound.sent.v1": OutboundSent,
    "omniroute.event.outbound.failed.v1": OutboundFailed,
    "omniroute.event.sla.breached.v1": SlaBreached,
}


def schema_name(model: BaseModel) -> str:
    """The versioned schema name of a model instance, for the AMQP ``type`` property."""
    for name, cls in SCHEMAS.items():
        if type(model) is cls:
            return name
    raise KeyError(type(model).__name__)


def schema_id(name: str) -> str:
    """The stable ``$id`` of a message type's JSON Schema (a URN: nothing to fetch)."""
    return f"urn:omniroute:schema:{name}"


def json_schemas() -> dict[str, dict[str, Any]]:
    """Every message type's JSON Schema, keyed by its versioned name."""
    return {
        name: {"$schema": JSON_SCHEMA_DIALECT, "$id": schema_id(name), **cls.model_json_schema()}
        for name, cls in SCHEMAS.items()
    }
