"""Writing a directory import to the database: one batch of parsed rows, one transaction.

Sole purpose: apply the rows ``routers.csv.format`` accepted, rejecting those that clash
with the file or the database (an id seen earlier in the file, an unknown team, an
identity another customer owns), without ever moving an identity from one customer to
another.

Invariants:
- Ids already seen in the file live in a temporary table on the import's own connection
  (``seen_table``), not in memory; identities claimed by earlier rows are found in the
  database itself.
- A customer row replaces that customer's identity set; an identity owned by another
  customer rejects the row.
"""

import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from routers.csv.format import Identity, Row
from routers.csv.report import ImportReport, Rejected
from routers.models import Agent, Customer, CustomerIdentity, Team
from routers.store.sql import upsert

CHUNK = 1_000  # rows per statement: keeps bound parameters far below SQLite's and asyncpg's limits

TEAMS: Table = Team.__table__  # type: ignore[assignment]
IDENTITIES: Table = CustomerIdentity.__table__  # type: ignore[assignment]
#: the table each kind of row is stored in
TABLES: dict[str, Table] = {
    "teams": TEAMS,
    "agents": Agent.__table__,  # type: ignore[dict-item]
    "customers": Customer.__table__,  # type: ignore[dict-item]
}


def _chunks(items: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _select_in(
    session: AsyncSession, columns: Sequence[Any], key: Any, values: Iterable[Any], *where: Any
) -> list[Any]:
    out: list[Any] = []
    for chunk in _chunks(sorted(set(values))):
        result = await session.execute(select(*columns).where(key.in_(chunk), *where))
        out.extend(result.all())
    return out


class BatchWriter:
    """Applies parsed rows of one kind; ``seen`` is the temporary table of ids in the file."""

    def __init__(self, kind: str, seen: Table, report: ImportReport) -> None:
        self.kind = kind
        self.seen = seen
        self.report = report
        self.table = TABLES[kind]
        self.tables = [self.table, seen] + ([IDENTITIES] if kind == "customers" else [])

    async def apply(self, session: AsyncSession, rows: list[Row]) -> list[Rejected]:
        rejects: list[Rejected] = []
        first_line: dict[str, int] = {}
        earlier = dict(
            await _select_in(
                session,
                [self.seen.c.id, self.seen.c.line],
                self.seen.c.id,
                (r.id for r in rows if r.id),
            )
        )
        good: list[Row] = []
        for row in rows:
            if row.id is not None:
                first = earlier.get(row.id, first_line.get(row.id))
                if first is not None:
                    rejects.append(
                        Rejected(row.line, f"duplicate id {row.id!r} (first on line {first})")
                    )
                    continue
                first_line[row.id] = row.line
            if row.error is not None:
                rejects.append(Rejected(row.line, row.error))
            else:
                good.append(row)
        for chunk in _chunks([{"id": i, "line": n} for i, n in first_line.items()]):
            await session.execute(insert(self.seen), chunk)

        if self.kind != "teams":
            wanted = {r.values["team_id"] for r in good if r.values["team_id"] is not None}
            teams = {t for (t,) in await _select_in(session, [TEAMS.c.id], TEAMS.c.id, wanted)}
            unknown = [r for r in good if r.values["team_id"] not in teams | {None}]
            rejects += [Rejected(r.line, f"unknown team {r.values['team_id']!r}") for r in unknown]
            good = [r for r in good if r not in unknown]
        added: list[dict[str, str]] = []
        removed: list[Identity] = []
        if self.kind == "customers":
            good, added, removed = await self._claims(session, good, rejects)

        ids = [r.id for r in good]
        existing = {
            i for (i,) in await _select_in(session, [self.table.c.id], self.table.c.id, ids)
        }
        # New rows go through one executemany INSERT (compiled once; a row created meanwhile
        # fails the batch loudly); existing ones through the upsert, which compiles per call.
        for chunk in _chunks([r.values for r in good if r.id not in existing]):
            await session.execute(insert(self.table), chunk)
        for chunk in _chunks([r.values for r in good if r.id in existing]):
            await upsert(session, self.table, chunk, ["id"])
        # After the customers: a new identity's owner must exist (foreign key).
        ident = IDENTITIES.c
        for identity_kind in ("email", "phone", "twitter"):
            gone = [a for k, a in removed if k == identity_kind]
            for chunk in _chunks(gone):
                await session.execute(
                    delete(IDENTITIES).where(ident.kind == identity_kind, ident.address.in_(chunk))
                )
        for chunk in _chunks(added):
            await session.execute(insert(IDENTITIES), chunk)
        self.report.updated += sum(1 for i in ids if i in existing)
        self.report.inserted += sum(1 for i in ids if i not in existing)
        self.report.identities_added += len(added)
        self.report.identities_removed += len(removed)
        return rejects

    async def _claims(
        self, session: AsyncSession, rows: list[Row], rejects: list[Rejected]
    ) -> tuple[list[Row], list[dict[str, str]], list[Identity]]:
        """Reject rows claiming an identity another customer owns; diff the others' sets.

        Ownership is read for the batch's addresses and the batch's customers at once, then
        updated row by row, so an identity released by an earlier row may be claimed later.
        Returns the accepted rows, the identities to add and the identities to remove.
        """
        ident = IDENTITIES.c
        columns = [ident.kind, ident.address, ident.customer_id]
        owner: dict[Identity, str] = {}
        for identity_kind in ("email", "phone", "twitter"):
            addresses = {a for r in rows for k, a in r.identities if k == identity_kind}
            where = ident.kind == identity_kind
            for k, a, c in await _select_in(session, columns, ident.address, addresses, where):
                owner[(k, a)] = c
        held: dict[str, set[Identity]] = {}
        for k, a, c in await _select_in(session, columns, ident.customer_id, (r.id for r in rows)):
            owner[(k, a)] = c
            held.setdefault(c, set()).add((k, a))

        good: list[Row] = []
        added: list[dict[str, str]] = []
        removed: list[Identity] = []
        for row in rows:
            assert row.id is not None
            taken = sorted(i for i in row.identities if owner.get(i, row.id) != row.id)
            if taken:
                k, a = taken[0]
                rejects.append(
                    Rejected(row.line, f"{k} {a} is owned by customer {owner[(k, a)]!r}")
                )
                continue
            good.append(row)
            before = held.get(row.id, set())
            for k, a in before - row.identities:
                del owner[(k, a)]
                removed.append((k, a))
            for k, a in row.identities - before:
                owner[(k, a)] = row.id
                added.append({"kind": k, "address": a, "customer_id": row.id})
        return good, added, removed


async def seen_table(conn: AsyncConnection) -> Table:
    from sqlalchemy import Column, Integer, MetaData, String

    name = f"omniroute_import_{uuid.uuid4().hex[:12]}"
    table = Table(
        name,
        MetaData(),
        Column("id", String(200), primary_key=True),
        Column("line", Integer, nullable=False),
        prefixes=["TEMPORARY"],
    )
    await conn.run_sync(table.create)
    await conn.commit()
    return table
