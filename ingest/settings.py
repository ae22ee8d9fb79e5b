"""Settings of the bus; the composition root (``config``) fills them in and passes them on."""

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: the shortest bus.heartbeat whose two periods cover aiormq's 7 s minimum to notice a stall
MIN_HEARTBEAT = 4


class BusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue_type: Literal["quorum", "classic"] = Field(
        default="quorum",
        description="quorum (replicated, needs RabbitMQ 3.8+) or classic queues; changing it "
        "needs the queues deleted first",
    )
    delivery_limit: int = Field(
        default=10,
        ge=1,
        le=1000,
        description="deliveries before the broker dead-letters a message that keeps failing "
        "(quorum queues); changing it needs the queues deleted first",
    )
    publish_timeout: float = Field(
        default=10.0, gt=0, description="seconds to wait for a publisher confirm"
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="seconds to connect")
    transient_retry_for: float = Field(
        default=600.0,
        gt=0,
        description="seconds a worker retries a message through a broker or directory "
        "outage (capped backoff) before it goes back to the queue, where each return counts "
        "against delivery_limit",
    )
    heartbeat: int = Field(
        default=15,
        ge=0,
        le=600,
        description="seconds, 0 (off) or at least 4; a stalled broker connection is noticed "
        "within two of these (the AMQP heartbeat asked for is shorter, to fit aiormq's "
        "dead-peer rule, which needs 7 s at least)",
    )

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat(cls, value: int) -> int:
        if 0 < value < MIN_HEARTBEAT:
            raise ValueError(
                f"must be 0 (off) or at least {MIN_HEARTBEAT}: the broker client notices a "
                "stalled connection after 7 s at the soonest, two heartbeats must cover that"
            )
        return value


class MetricsSettings(BaseModel):
    """What ``GET /metrics`` shows (issue 17): label values stay bounded whatever the traffic,
    and the broker is asked for queue depths at most once per ``queue_cache_for``."""

    model_config = ConfigDict(extra="forbid")

    max_team_labels: int = Field(
        default=50,
        ge=1,
        le=1000,
        description="distinct team ids a process gives their own label value; teams seen after "
        'that many are counted as team="other"',
    )
    agent_labels: bool = Field(
        default=False,
        description="count routed messages per agent too (omniroute_routed_agent_messages_"
        "total); off by default, as agents are many",
    )
    max_agent_labels: int = Field(
        default=500,
        ge=1,
        le=10000,
        description="with agent_labels, distinct agent ids with a label value of their own; "
        'later ones are counted as agent="other"',
    )
    queue_cache_for: float = Field(
        default=5.0,
        ge=0,
        le=300,
        description="seconds a scrape reuses the queue depths and consumer counts the broker "
        "gave the last one, so that many scrapers never hammer the broker",
    )
    queue_timeout: float = Field(
        default=2.0,
        gt=0,
        le=30,
        description="seconds a scrape waits for the broker's queue counts; past it the queue "
        "series are left out and omniroute_queue_stats_up is 0",
    )


#: where one node's URL ends and the next begins in ``amqp_url`` (issue 18): a comma before
#: the next ``amqp://`` or ``amqps://``, so that a comma inside one URL is never a split
_NEXT_NODE = re.compile(r",\s*(?=amqps?://)", re.IGNORECASE)


def amqp_nodes(url: str) -> list[str]:
    """The node URLs ``amqp_url`` names: one URL, or several joined by commas (the form the
    settings keep a list of nodes in)."""
    return _NEXT_NODE.split(url)
