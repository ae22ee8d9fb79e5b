"""Settings of the bus; the composition root (``config``) fills them in and passes them on."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class BusSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = Field(default=10, ge=1, le=1000)
    prefetch: int = Field(default=256, ge=1, le=65535)
    publish_timeout: float = Field(default=10.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    heartbeat: int = Field(default=15, ge=0, le=600)
