"""Export of the directory as CSV, in the very format ``omniroute directory import`` reads.

Sole purpose: write one kind's table (customers with their identities, teams and agents
with every column of issue 15, the teams' company days) to a file an operator can edit and
import again.

Invariant: no cell opens as a formula in a spreadsheet (OWASP's CSV-injection rule, see
``routers.csv.format.escape_cell``); the import undoes the escape, so export then import
gives back the same directory.
"""

import asyncio
import csv
from datetime import date
from typing import Any, TextIO

from sqlalchemy import bindparam, select, tuple_
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
    # holidays: one row per team and date, the table's key
    order = [table.c.team_id, table.c.day] if kind == "holidays" else [table.c.id]
    written = 0
    last: tuple[Any, ...] | None = None
    while True:
        query = select(table).order_by(*order).limit(batch_size)
        if last is not None:
            after = (bindparam(None, v, type_=c.type) for v, c in zip(last, order, strict=True))
            query = query.where(tuple_(*order) > tuple_(*after))
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
        lines = [[escape_cell(cell) for cell in _export_row(kind, row, held)] for row in page]
        await asyncio.to_thread(writer.writerows, lines)
        written += len(lines)
        last = tuple(page[-1][c.name] for c in order)


#: a CSV column stored under another name
_STORED_AS = {"team": "team_id", "date": "day"}


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _export_row(kind: str, row: Any, identities: dict[str, dict[str, list[str]]]) -> list[str]:
    if kind != "customers":
        return [_cell(row[_STORED_AS.get(c, c)]) for c in COLUMNS[kind]]
    held = identities.get(row["id"], {})
    return [
        row["id"],
        row["name"],
        _cell(row["team_id"]),
        *(";".join(held.get(k, [])) for _, k in IDENTITY_COLUMNS),
        _cell(row["language"]),
    ]
