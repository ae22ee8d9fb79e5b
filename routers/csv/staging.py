"""customers.csv staged in temporary tables on the import's connection, batch by batch.

Sole purpose: move parsed rows from the worker processes into the database as they come, so
the import holds no more than a few batches in memory whatever the file's size, and the
merge (``routers.csv.merge``) can decide the whole file in set-based SQL.

- ``ROWS``: one row per data line: its line, id (the duplicate key, even for a rejected
  row), the values of an accepted parse, or the parse error.
- ``IDENTITIES``: the normalised identities of each parsed row, with its customer id.

``stage_batch`` runs in the worker processes: it parses (``routers.csv.format``) and flattens
to plain tuples, which cross the process boundary and reach the driver cheapest.
"""

from typing import Any

from routers.csv.format import parse_batch
from routers.csv.link import Link

# temporary tables shadow any of the same name, and ``routers.csv.merge`` spells them out
ROWS = "import_rows"
IDENTITIES = "import_ids"
DROPPED = "import_dropped"  # lines the merge rejects, to take out of the stage
INVOLVED = "import_involved"  # lines whose identity claims are decided in Python
CONTESTED = "import_contested"
GONE = "import_gone"  # identities the file takes from their customers
TOUCHED = "import_touched"  # customers the merge updates
TABLES = (ROWS, IDENTITIES, DROPPED, INVOLVED, CONTESTED, GONE, TOUCHED)

ROW_COLUMNS = ("line", "id", "name", "team_id", "language", "error")
IDENTITY_COLUMNS = ("line", "customer_id", "kind", "address")

Batch = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


def stage_batch(
    header: list[str], region: str, records: list[tuple[int, list[str] | str]]
) -> Batch:
    """One batch of customers.csv parsed into ``ROWS`` and ``IDENTITIES`` records; a pure
    function, so it can run in a worker process."""
    rows: list[tuple[Any, ...]] = []
    identities: list[tuple[Any, ...]] = []
    for row in parse_batch("customers", header, region, records):
        if row.error is not None:
            rows.append((row.line, row.id, None, None, None, row.error))
            continue
        values = row.values
        rows.append(
            (row.line, row.id, values["name"], values["team_id"], values.get("language"), None)
        )
        identities += [(row.line, row.id, kind, address) for kind, address in row.identities]
    return rows, identities


async def create(link: Link) -> None:
    """Empty staging tables (a pooled connection may hold a failed import's)."""
    await drop(link)
    temporary = "CREATE TEMPORARY TABLE"
    await link.execute(
        f"{temporary} {ROWS} (line INTEGER PRIMARY KEY, id TEXT, name TEXT, team_id TEXT, "
        "language TEXT, error TEXT)"
    )
    await link.execute(
        f"{temporary} {IDENTITIES} (line INTEGER NOT NULL, customer_id TEXT NOT NULL, "
        "kind TEXT NOT NULL, address TEXT NOT NULL)"
    )
    await link.execute(f"{temporary} {DROPPED} (line INTEGER PRIMARY KEY)")
    await link.execute(f"{temporary} {INVOLVED} (line INTEGER PRIMARY KEY)")
    await link.execute(
        f"{temporary} {CONTESTED} (kind TEXT NOT NULL, address TEXT NOT NULL, "
        "PRIMARY KEY (kind, address))"
    )
    await link.execute(
        f"{temporary} {GONE} (kind TEXT NOT NULL, address TEXT NOT NULL, "
        "customer_id TEXT NOT NULL, PRIMARY KEY (kind, address))"
    )
    await link.execute(f"{temporary} {TOUCHED} (customer_id TEXT PRIMARY KEY)")


async def load(link: Link, batch: Batch) -> None:
    rows, identities = batch
    await link.load(ROWS, ROW_COLUMNS, rows)
    await link.load(IDENTITIES, IDENTITY_COLUMNS, identities)


async def index(link: Link) -> None:
    """The merge's lookups, built once the file is in (cheaper than row by row), and the
    planner's statistics (autovacuum never analyzes temporary tables). PostgreSQL joins
    the whole file by hashing; SQLite, which only loops, needs an index for each lookup."""
    await link.execute(f"CREATE INDEX {ROWS}_id ON {ROWS} (id)")
    if link.loops:
        await link.execute(f"CREATE INDEX {IDENTITIES}_address ON {IDENTITIES} (kind, address)")
        await link.execute(f"CREATE INDEX {IDENTITIES}_line ON {IDENTITIES} (line)")
    await link.execute(f"ANALYZE {ROWS}")
    await link.execute(f"ANALYZE {IDENTITIES}")


async def drop(link: Link) -> None:
    for table in TABLES:
        await link.execute(f"DROP TABLE IF EXISTS {table}")
