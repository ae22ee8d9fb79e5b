"""customers.csv, the directory's big file: staged in the database, then merged at once.

Sole purpose: import a million customers in minutes and in bounded memory. Batches are
parsed in worker processes (``routers.csv.pipeline``), streamed into temporary tables on
the import's own connection (``routers.csv.staging``: ``COPY`` on PostgreSQL, one
``executemany`` a batch on SQLite), and applied in one transaction by set-based SQL
(``routers.csv.merge``), so the file is applied whole or not at all.

SQLite: the merge's transaction takes the write lock for its duration (about 15 s for a
million rows on two quiet cores); the daemon's writes wait for it, and those waiting longer
than the busy timeout fail as on any busy database: import a big file at a quiet hour.
"""

from collections.abc import Callable
from contextlib import aclosing, suppress
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from routers.csv import staging
from routers.csv.link import ERRORS, Link, link
from routers.csv.merge import merge
from routers.csv.pipeline import Parsing
from routers.csv.report import ImportAborted, ImportReport


async def import_customers(
    engine: AsyncEngine,
    parsing: Parsing,
    report: ImportReport,
    progress: Callable[[ImportReport], None] | None,
) -> None:
    """Stage every batch, then merge in one transaction, rolled back for a dry run.
    ``progress`` gets the report after each staged batch but the last, once the merge
    starts (``merging`` set), then after the merge."""
    async with engine.connect() as conn:
        db = await link(conn)
        try:
            await db.tune()
            await staging.create(db)
            await _stage(db, parsing, report, progress)
            report.merging = True
            if progress is not None:
                progress(report)  # the file is read; the merge can take minutes at 10M rows
            await staging.index(db)
            await db.begin()
            await merge(db, report, language="language" in parsing.source.header)
            report.merging = False
            await (db.rollback() if report.dry_run else db.commit())
        except ERRORS as exc:
            raise ImportAborted(
                f"database error, nothing from the file was applied: {exc}", report
            ) from exc
        finally:
            # on a lost connection the error above says so; create() drops leftovers
            with suppress(*ERRORS):
                await db.rollback()
                await staging.drop(db)
                await db.untune()
    if progress is not None:
        progress(report)


async def _stage(
    db: Link,
    parsing: Parsing,
    report: ImportReport,
    progress: Callable[[ImportReport], None] | None,
) -> None:
    parse = partial(staging.stage_batch, parsing.source.header, parsing.region)
    batches = 0
    async with aclosing(parsing.batches(parse)) as stream:
        async for batch, count in stream:
            if batches and progress is not None:
                progress(report)  # the batch before: not the last one
            await staging.load(db, batch)
            report.rows += count
            batches += 1
