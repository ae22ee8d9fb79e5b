"""The directory and routing-state tables (SQLAlchemy 2); Alembic migrations mirror these.

Every lookup the router makes per message is by primary key or a unique index, so a
directory of millions of customers answers in constant time.
"""

from datetime import datetime

from sqlalchemy import (
    Boolean,
    DateTime,
    ForeignKey,
    Index,
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


class Agent(Base):
    __tablename__ = "agents"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(400))
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), index=True)
    email: Mapped[str | None] = mapped_column(String(400))
    phone: Mapped[str | None] = mapped_column(String(100))
    dial: Mapped[str | None] = mapped_column(String(400))
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Customer(Base):
    __tablename__ = "customers"
    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    name: Mapped[str] = mapped_column(String(400))
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id"), index=True)


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
    "Agent",
    "AgentPresence",
    "Base",
    "Cursor",
    "Customer",
    "CustomerIdentity",
    "LastAgent",
    "RoutedRecord",
    "SeenId",
    "SentReply",
    "Team",
    "ThreadOwner",
]
