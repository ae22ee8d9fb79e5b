"""A customer's recent contacts on both databases: newest first, at most the limit each,
only the customers asked for, however long their history (issue 18: the PostgreSQL form
reads ``limit`` rows a customer through the index instead of the whole history)."""

from datetime import UTC, datetime, timedelta

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from routers.models import RoutedRecord
from routers.store.routed_log import recent_contacts

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


def _row(customer: str | None, i: int) -> dict[str, object]:
    return {
        "id": f"m-{customer}-{i}",
        "channel": "sms" if i % 2 else "email",
        "external_id": f"x-{customer}-{i}",
        "customer_id": customer,
        "route_kind": "team",
        "route_target": f"t{i}",
        "reason": "dedicated_team",
        "routed_at": T0 + timedelta(minutes=i),
        "message": "{}",
    }


async def test_newest_first_limited_per_customer(db: AsyncEngine) -> None:
    rows = [_row("a", i) for i in range(40)] + [_row("b", i) for i in range(2)]
    rows += [_row("c", i) for i in range(7)] + [_row(None, i) for i in range(3)]
    async with db.begin() as conn:
        await conn.execute(insert(RoutedRecord.__table__), rows)  # type: ignore[arg-type]
        found = await conn.run_sync(lambda c: recent_contacts(c, ["b", "a", "nobody"], 3))

    assert sorted(found) == ["a", "b"], "only the customers asked for, and only those seen"
    assert [c.message_id for c in found["a"]] == ["m-a-39", "m-a-38", "m-a-37"]
    assert [c.message_id for c in found["b"]] == ["m-b-1", "m-b-0"]
    newest = found["a"][0]
    assert (newest.channel, newest.route, newest.at) == (
        "sms",
        "team.t39",
        T0 + timedelta(minutes=39),
    )
