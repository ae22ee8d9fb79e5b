"""Events and reply requests are checked, not believed (issue 13): who published them, when
they say they happened, and whom they name.

Who: RabbitMQ refuses a publish whose AMQP ``user_id`` property is not the publishing
connection's user, so ``user_id`` is the one fact about a message's author a publisher
cannot forge. With ``events.trusted_publishers`` set, only those users, and omniroute's own
(the ``Bus`` stamps it on everything omniroute publishes), are believed. When: an ``at``
further ahead than ``events.max_clock_skew`` would win every later comparison of routing
state (last agent, presence) for ever. Whom: an agent or a customer the directory does not
know would become routing state nobody can route to.

Each refusal is a ``RefusedError``: the consumer dead-letters the message with the reason,
acks it, and counts it in ``omniroute_dead_lettered_total``; the queue goes on.
"""

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from ingest.errors import RefusedError
from ingest.schema import utcnow
from routers.models import Agent, Customer
from routers.settings import EventsSettings


def check_publisher(settings: EventsSettings, user_id: str | None, own_user: str | None) -> None:
    """Refuse a message whose broker-checked author is not trusted (an empty list trusts all)."""
    trusted = settings.trusted_publishers
    if not trusted or (user_id is not None and (user_id in trusted or user_id == own_user)):
        return
    who = "no user_id property" if user_id is None else f"user_id {user_id[:255]!r}"
    raise RefusedError("untrusted_publisher", f"{who}: not in events.trusted_publishers")


def check_time(settings: EventsSettings, at: datetime, now: datetime | None = None) -> None:
    """Refuse a date further ahead of our clock than a publisher's clock may run."""
    ahead = at - (now or utcnow())
    if ahead > settings.max_clock_skew:
        raise RefusedError(
            "future_timestamp",
            f"at {at.isoformat()} is {ahead} ahead of omniroute's clock "
            f"(events.max_clock_skew {settings.max_clock_skew})",
        )


async def check_agent(session: AsyncSession, agent_id: str) -> None:
    """Refuse an agent id the directory does not have (a deactivated agent is still known)."""
    if await session.get(Agent, agent_id) is None:
        raise RefusedError("unknown_agent", f"agent {agent_id!r} is not in the directory")


async def check_customer(session: AsyncSession, customer_id: str) -> None:
    """Refuse a customer id the directory does not have."""
    if await session.get(Customer, customer_id) is None:
        raise RefusedError("unknown_customer", f"customer {customer_id!r} is not in the directory")
