"""CSV import of the directory: teams, agents, customers with their identities, and the
teams' company days (holidays.csv).

Sole purpose: load an operator's directory file of any size into the database, applying
every valid row and naming every rejected one by line and reason, without ever moving an
identity from one customer to another behind the operator's back. The file format and
row validation are ``routers.csv.format``; the answer ``routers.csv.report``; the database
writing ``routers.csv.bulk`` for customers (the big file: staged, then merged in SQL) and
``routers.csv.writer`` for the others (small files, row by row).

Invariants:
- The file is streamed in batches of ``BATCH`` rows, parsed ahead in worker processes, so
  memory stays bounded whatever the file's size (only the rejected rows are kept).
- customers.csv is applied in one transaction: all of it or, when the database fails,
  nothing. The other kinds apply each batch in one transaction: a failed batch leaves no
  half-applied row, and the batches before it stay applied.
- ``dry_run`` runs the very same code inside a transaction that is rolled back, so it
  reports exactly what a real import would, including conflicts within the file.
"""

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import aclosing
from functools import partial
from multiprocessing import get_context
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from routers.csv.bulk import import_customers
from routers.csv.format import BATCH, parse_batch
from routers.csv.pipeline import Parsing
from routers.csv.report import ImportAborted, ImportReport
from routers.csv.source import CsvSource
from routers.csv.writer import BatchWriter, seen_table

PARALLEL_BYTES = 16 * 2**20  # below this, spawning worker processes costs more than it saves


async def import_csv(
    engine: AsyncEngine,
    path: Path,
    *,
    kind: str | None,
    region: str,
    dry_run: bool,
    progress: Callable[[ImportReport], None] | None = None,
    batch_size: int = BATCH,
    workers: int | None = None,
    delimiter: str | None = None,
    encoding: str = "utf-8",
) -> ImportReport:
    """Import ``path`` (kind from its header unless ``kind`` is given); see the module doc.

    Raises ``ImportFileError`` when the file cannot be read as a directory CSV at all, and
    ``ImportAborted`` when the database fails (see the module doc for what stays applied).
    ``progress`` gets the running report after every batch (customers: every batch read
    but the last, the merge's start, then its end). ``workers`` processes normalise batches
    ahead of the database (phone parsing dominates); ``None`` uses one per CPU for files over
    ``PARALLEL_BYTES``, 0 a thread. Worker processes are spawned, so a calling script
    needs a ``__main__`` guard.
    ``delimiter`` (None: sniffed from the header) and ``encoding`` go to ``CsvSource``.
    """
    source = await asyncio.to_thread(
        partial(CsvSource, delimiter=delimiter, encoding=encoding), path, kind, region
    )
    if workers is None:
        size = (await asyncio.to_thread(path.stat)).st_size
        workers = (os.cpu_count() or 1) if size > PARALLEL_BYTES else 0
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers else None
    report = ImportReport(kind=source.kind, dry_run=dry_run)
    parsing = Parsing(source, region, pool, batch_size, depth=max(workers, 1) + 1)
    try:
        if source.kind == "customers":
            await import_customers(engine, parsing, report, progress)
            return report
        async with engine.connect() as conn:
            seen = await seen_table(conn)
            try:
                outer = await conn.begin() if dry_run else None
                async with AsyncSession(bind=conn, expire_on_commit=False) as session:
                    await _run(session, parsing, BatchWriter(source.kind, seen, report), progress)
                if outer is not None:
                    await outer.rollback()
            finally:
                if conn.in_transaction():
                    await conn.rollback()
                await conn.run_sync(seen.drop, checkfirst=True)
                await conn.commit()
    finally:
        source.close()
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
    return report


async def _run(
    session: AsyncSession,
    parsing: Parsing,
    writer: BatchWriter,
    progress: Callable[[ImportReport], None] | None,
) -> None:
    """Apply the batches in file order, ``depth`` of them parsing ahead."""
    report = writer.report
    postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    source = parsing.source
    parse = partial(parse_batch, source.kind, source.header, parsing.region)
    batches = 0
    async with aclosing(parsing.batches(parse)) as stream:
        async for rows, _ in stream:
            try:
                async with session.begin():
                    rejects = await writer.apply(session, rows)
                    batches += 1
                    if postgres and batches & (batches - 1) == 0:
                        # The tables grow faster than autovacuum re-analyzes them (temporary
                        # tables never are): on stale statistics the planner filters whole
                        # tables for each IN lookup, which is quadratic. Analyze at batches
                        # 1, 2, 4, 8...: log(n) cheap sampled passes.
                        for table in writer.tables:
                            await session.execute(text(f'ANALYZE "{table.name}"'))
            except SQLAlchemyError as exc:
                raise ImportAborted(
                    f"database error on lines {rows[0].line}-{rows[-1].line}, "
                    f"nothing from them was applied: {exc}",
                    report,
                ) from exc
            report.rows += len(rows)
            report.rejects += sorted(rejects)
            if progress is not None:
                progress(report)
    await _finish(session, writer, progress)


async def _finish(
    session: AsyncSession, writer: BatchWriter, progress: Callable[[ImportReport], None] | None
) -> None:
    """The writer's last transaction: rows that named a team or agent defined further down
    the file, and the company days the file no longer lists."""
    report = writer.report
    try:
        async with session.begin():
            rejects = await writer.finish(session)
    except SQLAlchemyError as exc:
        raise ImportAborted(
            "database error applying the rows that name a later team or agent, or removing "
            f"company days; nothing of that was applied: {exc}",
            report,
        ) from exc
    if rejects:
        report.rejects = sorted(report.rejects + rejects)
        if progress is not None:
            progress(report)
