"""Settings of the bus; the composition root (``config``) fills them in and passes them on."""

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
