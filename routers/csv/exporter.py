"""Export of the directory as CSV, in the very format ``omniroute directory import`` reads.

Sole purpose: write one kind's table (customers with their identities) to a file an
operator can edit and import again.

Invariant: no cell opens as a formula in a spreadsheet (OWASP's CSV-injection rule, see
``routers.csv.format.escape_cell``); the import undoes the escape, so export then import
gives back the same directory.
"""

import asyncio
import csv
from typing import Any, TextIO

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from routers.csv.format import BATCH, COLUMNS, IDENTITY_COLUMNS, ImportFileError, escape_cell
from routers.csv.writer import IDENTITIES, TABLES


async def export_csv(
    engine: AsyncEngine, kind: str, out: TextIO, *, batch_size: int = BATCH
) -> int:
    """Write the ``kind`` table to ``out`` in the import format; returns the rows written.

    Pages by id (keyset), so the export holds one page in memory and no long transaction.
    """
    if kind not in COLUMNS:
        raise ImportFileError(f"unknown kind {kind!r}; expected one of {', '.join(COLUMNS)}")
    writer = csv.writer(out, lineterminator="\n")
    await asyncio.to_thread(writer.writerow, COLUMNS[kind])
    table = TABLES[kind]
    written = 0
    last: str | None = None
    while True:
        query = select(table).order_by(table.c.id).limit(batch_size)
        if last is not None:
            query = query.where(table.c.id > last)
        async with engine.connect() as conn:
            page = (await conn.execute(query)).mappings().all()
            held: dict[str, dict[str, list[str]]] = {}
            if kind == "customers" and page:
                ident = IDENTITIES.c
                result = await conn.execute(
                    select(ident.customer_id, ident.kind, ident.address)
                    .where(ident.customer_id.in_([r["id"] for r in page]))
                    .order_by(ident.customer_id, ident.kind, ident.address)
                )
                for customer_id, identity_kind, address in result.all():
                    held.setdefault(customer_id, {}).setdefault(identity_kind, []).append(address)
        if not page:
            return written
        lines = [
            [escape_cell(cell) for cell in _export_row(kind, row, held.get(row["id"], {}))]
            for row in page
        ]
        await asyncio.to_thread(writer.writerows, lines)
        written += len(lines)
        last = page[-1]["id"]


def _export_row(kind: str, row: Any, held: dict[str, list[str]]) -> list[str]:
    def s(value: str | None) -> str:
        return value or ""

    if kind == "teams":
        return [row["id"], row["name"], s(row["dial"]), s(row["email"])]
    if kind == "agents":
        return [
            row["id"],
            row["name"],
            s(row["team_id"]),
            s(row["email"]),
            s(row["phone"]),
            s(row["dial"]),
            "true" if row["active"] else "false",
        ]
    return [
        row["id"],
        row["name"],
        s(row["team_id"]),
        *(";".join(held.get(k, [])) for _, k in IDENTITY_COLUMNS),
    ]
