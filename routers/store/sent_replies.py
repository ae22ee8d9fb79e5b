"""The record of replies sent: an outbound request that reached its channel is not sent
again when it is redelivered. Kept ``routing.routed_log_days``
(``routers.store.maintenance``)."""

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from routers.models import SentReply
from routers.store.sql import insert_new
from routers.store.values import utc


async def record_sent(
    session: AsyncSession, request_id: str, channel: str, external_id: str | None, at: datetime
) -> None:
    await insert_new(
        session,
        SentReply.__table__,  # type: ignore[arg-type]
        {"id": request_id, "channel": channel, "external_id": external_id, "at": utc(at)},
        ["id"],
    )
