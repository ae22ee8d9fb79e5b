"""Every reason a routing decision can carry: ``route.reason``'s enum (DESIGN.md contract:
names are added, never renamed). Re-exported by ``ingest.schema``."""

from typing import Annotated, Literal

from pydantic import Field

#: Every reason a decision can carry (DESIGN.md contract: names are added, never renamed).
ReasonName = Literal[
    # the routing policy's order
    "thread_owner",
    "last_agent",
    "dedicated_team",
    "unknown_sender",
    "no_team",
    "bounce",
    # an unavailable agent sent it on to the team
    "thread_owner_fallback",
    "last_agent_fallback",
    # caller-ID answers taken without the policy
    "withheld_caller",
    "decider_unavailable",
    # contract additions of December 2026 (DESIGN.md)
    "after_hours",
    "holiday",
    "deputy",
    "last_agent_busy",
    "thread_owner_busy",
    "offer_timeout",
    "declined",
    "escalated",
    "unverified_sender",
    # issue 20: an operator's [[routing.rules]] rule decided (route.rule names it)
    "topic",
]
Reason = Annotated[
    ReasonName,
    Field(
        description="why the message went where it did: a step of the routing policy "
        "(thread_owner, last_agent, dedicated_team, unknown_sender, no_team), a *_fallback "
        "when an unavailable agent sent it on to the team, unverified_sender when the sender "
        "is not proven to be the customer, topic when an operator's rule decided (route.rule), or "
        "one of the other listed reasons"
    ),
]
