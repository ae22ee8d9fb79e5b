"""The directory and routing-state tables (SQLAlchemy 2); Alembic migrations mirror these.

Every lookup the router makes per message is by primary key or a unique index, so a
directory of millions of customers answers in constant time.
"""

from datetime import date, datetime

from sqlalchemy import (
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Team(Base):
    __tablename__ = "teams"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(400))
    dial: Mapped[str | None] = mapped_column(String(400))
    email: Mapped[str | None] = mapped_column(String(400))
    # issue 15: when the team works (routers.schedule), and who takes over when it does not
    timezone: Mapped[str | None] = mapped_column(String(64))
    hours: Mapped[str | None] = mapped_column(String(400))
    holidays: Mapped[str | None] = mapped_column(String(16))
    after_hours: Mapped[str | None] = mapped_column(String(200))
    after_hours_dial: Mapped[str | None] = mapped_column(String(400))
    # issue 16: how soon a customer's message must have a first answer, per channel, counted
    # in the team's opening hours (``email=4h;sms=15m``), and whom it escalates to then
    first_response: Mapped[str | None] = mapped_column(String(400))
    escalate_to: Mapped[str | None] = mapped_column(String(200))


class CompanyHoliday(Base):
    """A row of holidays.csv: a team's own closed day, or a half day (``hours``)."""

    __tablename__ = "team_holidays"
    team_id: Mapped[str] = mapped_column(
        ForeignKey("teams.id", ondelete="CASCADE"), primary_key=True
    )
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    hours: Mapped[str | None] = mapped_column(String(400))


class Agent(Base):
    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(400))
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), index=True)
    email: Mapped[str | None] = mapped_column(String(400))
    phone: Mapped[str | None] = mapped_column(String(100))
    dial: Mapped[str | None] = mapped_column(String(400))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # issue 15: who stands in while the agent is away, how much they take, when they work
    deputy: Mapped[str | None] = mapped_column(String(200))
    capacity: Mapped[str | None] = mapped_column(String(400))
    hours: Mapped[str | None] = mapped_column(String(400))


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(400))
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), index=True)
    #: issue 16: the language of acknowledgements (``tr``, ``en``); None: ack.default_language
    language: Mapped[str | None] = mapped_column(String(16))


class CustomerIdentity(Base):
    """One normalised address of a customer; (kind, address) is unique across customers."""

    __tablename__ = "identities"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    address: Mapped[str] = mapped_column(String(512), primary_key=True)
    customer_id: Mapped[str] = mapped_column(
        ForeignKey("customers.id", ondelete="CASCADE"), index=True
    )


class LastAgent(Base):
    __tablename__ = "last_agent"
    customer_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ThreadOwner(Base):
    """A Message-ID omniroute sent on behalf of an agent (RFC 5322 msg-id, without <>)."""

    __tablename__ = "thread_owners"
    message_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(200))
    customer_id: Mapped[str | None] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class AgentPresence(Base):
    __tablename__ = "agent_presence"
    agent_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: away or offline until then (None: until another status event); past: back at work
    until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: who stands in meanwhile, overriding agents.csv's ``deputy``
    deputy: Mapped[str | None] = mapped_column(String(200))


class Assignment(Base):
    """A message routed to an agent and not answered yet: the agent's load on its channel.

    Written with the routed record (one per message id, however often it is redelivered or
    however many routers run); closed by the agent's reply to that customer or by an
    ``assignment.closed`` event; counted only within ``routing.load_window``."""

    __tablename__ = "assignments"
    __table_args__ = (Index("ix_assignments_agent_open", "agent_id", "closed_at", "assigned_at"),)
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(200))
    customer_id: Mapped[str | None] = mapped_column(String(200), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    assigned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # issue 16: the message is an offer until accepted; at ``offer_due_at`` (or at once when
    # declined) the timer worker routes it again without the agent
    offer_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: why the offer ended: offer_timeout or declined (None: open, accepted or answered)
    outcome: Mapped[str | None] = mapped_column(String(16))
    #: the attempt that made this offer (1: the first decision)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    #: the whole InboundMessage while the offer is open (the routed record keeps only a
    #: short copy): a message routed again keeps its text and attachments
    message: Mapped[str | None] = mapped_column(Text)


class RoutedRecord(Base):
    """A bounded record of routed messages: lets a reply name the message it answers,
    gives every routed message the customer's recent contacts, and removes duplicates."""

    __tablename__ = "routed"
    __table_args__ = (
        UniqueConstraint("channel", "external_id", name="uq_routed_channel_external"),
        Index("ix_routed_customer_at", "customer_id", "routed_at"),
    )
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str] = mapped_column(String(512))
    thread_message_id: Mapped[str | None] = mapped_column(String(512), index=True)
    customer_id: Mapped[str | None] = mapped_column(String(200))
    route_kind: Mapped[str] = mapped_column(String(16))
    route_target: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(String(64))
    routed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    message: Mapped[str] = mapped_column(Text)
    #: the attempt of the route recorded (issue 16: offers and escalation route again)
    attempt: Mapped[int] = mapped_column(Integer, default=1)


class Waiting(Base):
    """A customer's message waiting for its first answer (issue 16): at ``due_at``, counted
    in the opening hours of the team it went to, it escalates one ``level``. Any answer to
    that customer (or to this message) stops it."""

    __tablename__ = "waiting"
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    customer_id: Mapped[str | None] = mapped_column(String(200), index=True)
    #: the team whose first-response time runs (the route's team, or its agent's)
    team_id: Mapped[str] = mapped_column(String(200))
    channel: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    #: None: nothing more to escalate (answered, or the chain ended)
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    level: Mapped[int] = mapped_column(Integer, default=0)
    answered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: the whole InboundMessage, to route it again
    message: Mapped[str] = mapped_column(Text)


class AckSent(Base):
    """The last acknowledgement a customer got (issue 16): at most one per ``ack.quiet_for``
    across channels and instances. ``key`` is ``customer:<id>``, or ``<kind>:<address>``
    for an unknown sender."""

    __tablename__ = "acks"
    key: Mapped[str] = mapped_column(String(600), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class Cursor(Base):
    """Where a poller stopped (a mailbox's UIDVALIDITY and last UID, an X since_id)."""

    __tablename__ = "cursors"
    key: Mapped[str] = mapped_column(String(400), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class SeenId(Base):
    """Channel ids already taken in (MessageSid, CallSid, Message-ID, tweet and DM ids)."""

    __tablename__ = "seen"
    channel: Mapped[str] = mapped_column(String(16), primary_key=True)
    external_id: Mapped[str] = mapped_column(String(512), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class SentReply(Base):
    """Reply requests already sent, so a redelivered request is not sent twice."""

    __tablename__ = "sent_replies"
    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    channel: Mapped[str] = mapped_column(String(16))
    external_id: Mapped[str | None] = mapped_column(String(512))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


__all__ = [
    "AckSent",
    "Agent",
    "AgentPresence",
    "Assignment",
    "Base",
    "CompanyHoliday",
    "Cursor",
    "Customer",
    "CustomerIdentity",
    "LastAgent",
    "RoutedRecord",
    "SeenId",
    "SentReply",
    "Team",
    "ThreadOwner",
    "Waiting",
]


class ShadowDiff(Base):
    """A message the candidate rules of ``routing.shadow_rules`` would have routed elsewhere
    (issue 20), for ``omniroute rules diff``; pruned with the routed log."""

    __tablename__ = "shadow_diffs"
    message_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    channel: Mapped[str] = mapped_column(String(16))
    #: routing keys (team.<id>, agent.<id>, triage) and reasons, live and candidate
    live: Mapped[str] = mapped_column(String(210))
    live_reason: Mapped[str] = mapped_column(String(64))
    shadow: Mapped[str] = mapped_column(String(210))
    shadow_reason: Mapped[str] = mapped_column(String(64))
    #: the rule that made the difference: the candidate's, else the live one's
    rule: Mapped[str | None] = mapped_column(String(100))
