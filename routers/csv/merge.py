"""customers.csv, once staged (``routers.csv.staging``), merged into the directory in SQL.

Sole purpose: apply the whole file in a few set-based statements with exactly the outcome
of applying its rows one by one in file order: a repeated id, a parse error or an unknown
team rejects its row; an identity another customer owns rejects the row claiming it,
unless an earlier row of the file released it; of two rows claiming one identity the
first wins. Those ownership contests are rare (none in a clean or repeated import), so the
rows involved in one are found in SQL and decided in file order by
``routers.csv.claims``; every other row is applied set-based.

Invariants:
- A row updates only the columns its file has (an old header leaves ``language`` as it is),
  and only when something differs: an unchanged file re-imported writes nothing.
- An accepted row replaces its customer's identity set (gone ones deleted, new ones
  inserted); ``updated`` counts a changed identity set only for a customer who had
  identities, as the row-by-row importer did.
"""

from routers.csv import staging
from routers.csv.claims import Claim, decide
from routers.csv.format import Identity
from routers.csv.link import Link
from routers.csv.report import ImportReport, Rejected

# The statements name staging's tables: import_rows r, import_ids n, import_dropped,
# import_contested x, import_involved v.
assert (staging.ROWS, staging.IDENTITIES) == ("import_rows", "import_ids")

DUPLICATES = """
SELECT r.line, r.id, f.first FROM import_rows r
JOIN (SELECT id, MIN(line) AS first FROM import_rows WHERE id IS NOT NULL
      GROUP BY id HAVING COUNT(*) > 1) f ON f.id = r.id
WHERE r.line > f.first"""
ERRORS = "SELECT line, error FROM import_rows WHERE error IS NOT NULL"
UNKNOWN_TEAMS = """
SELECT r.line, r.team_id FROM import_rows r
WHERE r.error IS NULL AND r.team_id IS NOT NULL
  AND NOT EXISTS (SELECT 1 FROM teams t WHERE t.id = r.team_id)"""
DROP = (
    "DELETE FROM import_rows WHERE line IN (SELECT line FROM import_dropped)",
    "DELETE FROM import_ids WHERE line IN (SELECT line FROM import_dropped)",
    "DELETE FROM import_dropped",
)
# an identity claimed by two rows, or by a customer who does not own it
CONTESTED = (
    """INSERT INTO import_contested (kind, address)
SELECT kind, address FROM import_ids GROUP BY kind, address HAVING COUNT(*) > 1""",
    """INSERT INTO import_contested (kind, address)
SELECT DISTINCT n.kind, n.address FROM import_ids n
JOIN identities i ON i.kind = n.kind AND i.address = n.address
WHERE i.customer_id <> n.customer_id
  AND NOT EXISTS (SELECT 1 FROM import_contested x
                  WHERE x.kind = n.kind AND x.address = n.address)""",
)
ANY_CONTESTED = "SELECT 1 FROM import_contested LIMIT 1"
# the rows claiming a contested identity, and the rows of the customers owning one
INVOLVED = (
    """INSERT INTO import_involved (line)
SELECT DISTINCT n.line FROM import_contested x
JOIN import_ids n ON n.kind = x.kind AND n.address = x.address""",
    """INSERT INTO import_involved (line)
SELECT DISTINCT r.line FROM import_contested x
JOIN identities i ON i.kind = x.kind AND i.address = x.address
JOIN import_rows r ON r.id = i.customer_id
WHERE NOT EXISTS (SELECT 1 FROM import_involved v WHERE v.line = r.line)""",
)
INVOLVED_CLAIMS = """
SELECT r.line, r.id, n.kind, n.address FROM import_involved v
JOIN import_rows r ON r.line = v.line LEFT JOIN import_ids n ON n.line = v.line"""
INVOLVED_HELD = """
SELECT i.kind, i.address, i.customer_id FROM import_involved v
JOIN import_rows r ON r.line = v.line JOIN identities i ON i.customer_id = r.id"""
INVOLVED_OWNERS = """
SELECT i.kind, i.address, i.customer_id FROM import_involved v
JOIN import_ids n ON n.line = v.line
JOIN identities i ON i.kind = n.kind AND i.address = n.address"""
# The customers whose columns differ, and those whose identity set changes (gone ones, or
# new ones for a customer who had identities) are "updated": collected in import_touched
# as the writes go, each found once.
TOUCH_COLUMNS = """
INSERT INTO import_touched (customer_id)
SELECT r.id FROM import_rows r JOIN customers c ON c.id = r.id WHERE {differs}"""
UPDATE = """
UPDATE customers SET {assigned} FROM import_rows r
WHERE customers.id = r.id AND ({differs})"""
INSERT = """
INSERT INTO customers (id, {columns}) SELECT r.id, {values} FROM import_rows r
WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.id = r.id) ORDER BY r.id"""
GONE = (
    """INSERT INTO import_gone (kind, address, customer_id)
SELECT i.kind, i.address, i.customer_id FROM import_rows r
JOIN identities i ON i.customer_id = r.id
WHERE NOT EXISTS (SELECT 1 FROM import_ids n WHERE n.kind = i.kind
                  AND n.address = i.address AND n.customer_id = i.customer_id)""",
    """INSERT INTO import_touched (customer_id)
SELECT DISTINCT g.customer_id FROM import_gone g
WHERE NOT EXISTS (SELECT 1 FROM import_touched t WHERE t.customer_id = g.customer_id)""",
    "ANALYZE import_gone",  # few rows, usually none: PostgreSQL then looks them up by key
)
REMOVE_IDENTITIES = """
DELETE FROM identities WHERE (kind, address) IN (SELECT kind, address FROM import_gone)"""
# after the removals a customer who had identities and is not touched yet still has some
TOUCH_NEW = """
INSERT INTO import_touched (customer_id)
SELECT DISTINCT n.customer_id FROM import_ids n
WHERE NOT EXISTS (SELECT 1 FROM identities i WHERE i.kind = n.kind AND i.address = n.address)
  AND EXISTS (SELECT 1 FROM identities h WHERE h.customer_id = n.customer_id)
  AND NOT EXISTS (SELECT 1 FROM import_touched t WHERE t.customer_id = n.customer_id)"""
UPDATED = "SELECT COUNT(*) FROM import_touched"
# after the removals: an identity still stored is the row's customer's own; in key order,
# the unique index grows at its end
ADD_IDENTITIES = """
INSERT INTO identities (kind, address, customer_id)
SELECT n.kind, n.address, n.customer_id FROM import_ids n
WHERE NOT EXISTS (SELECT 1 FROM identities i WHERE i.kind = n.kind AND i.address = n.address)
ORDER BY n.kind, n.address"""


async def merge(link: Link, report: ImportReport, *, language: bool) -> None:
    """Apply the staged file on ``link``'s open transaction; fill in ``report``."""
    rejects = await _row_rejects(link)
    await _drop(link, [r.line for r in rejects])
    contests = await _contests(link)
    await _drop(link, [r.line for r in contests])
    await _apply(link, report, ["name", "team_id", *(["language"] if language else [])])
    report.rejects = sorted(rejects + contests)


async def _row_rejects(link: Link) -> list[Rejected]:
    """Repeated ids (the first stays), parse errors and unknown teams, in that order of
    precedence for one row."""
    rejects = [
        Rejected(line, f"duplicate id {key!r} (first on line {first})")
        for line, key, first in await link.fetch(DUPLICATES)
    ]
    seen = {r.line for r in rejects}
    rejects += [Rejected(n, error) for n, error in await link.fetch(ERRORS) if n not in seen]
    unknown = await link.fetch(UNKNOWN_TEAMS)
    rejects += [Rejected(n, f"unknown team {team!r}") for n, team in unknown if n not in seen]
    return rejects


async def _drop(link: Link, lines: list[int]) -> None:
    """Take rejected lines out of the stage: what remains is applied."""
    if lines:
        await link.load(staging.DROPPED, ("line",), [(line,) for line in lines])
        for statement in DROP:
            await link.execute(statement)


async def _contests(link: Link) -> list[Rejected]:
    """The claim rejects: the rows involved in a contest, decided in file order."""
    for statement in CONTESTED:
        await link.execute(statement)
    if not await link.fetch(ANY_CONTESTED):
        return []
    for statement in INVOLVED:
        await link.execute(statement)
    claimed: dict[int, tuple[str, set[Identity]]] = {}
    for line, customer, kind, address in await link.fetch(INVOLVED_CLAIMS):
        _, identities = claimed.setdefault(line, (customer, set()))
        if kind is not None:
            identities.add((kind, address))
    held: dict[str, set[Identity]] = {}
    owner: dict[Identity, str] = {}
    for kind, address, customer in await link.fetch(INVOLVED_HELD):
        held.setdefault(customer, set()).add((kind, address))
        owner[(kind, address)] = customer
    for kind, address, customer in await link.fetch(INVOLVED_OWNERS):
        owner[(kind, address)] = customer
    claims = [Claim(line, who, frozenset(ids)) for line, (who, ids) in claimed.items()]
    return decide(claims, owner, held)


async def _apply(link: Link, report: ImportReport, columns: list[str]) -> None:
    """Write changed customers, new customers, gone identities, new ones; count as it goes.
    ``columns`` are the file's (never user text: safe to format into the SQL)."""
    differs = " OR ".join(f"c.{col} {link.distinct} r.{col}" for col in columns)
    await link.execute(TOUCH_COLUMNS.format(differs=differs))
    await link.execute(
        UPDATE.format(
            assigned=", ".join(f"{col} = r.{col}" for col in columns),
            differs=" OR ".join(f"customers.{col} {link.distinct} r.{col}" for col in columns),
        )
    )
    report.inserted = await link.execute(
        INSERT.format(columns=", ".join(columns), values=", ".join(f"r.{c}" for c in columns))
    )
    for statement in GONE:
        await link.execute(statement)
    report.identities_removed = await link.execute(REMOVE_IDENTITIES)
    await link.execute(TOUCH_NEW)
    report.identities_added = await link.execute(ADD_IDENTITIES)
    ((updated,),) = await link.fetch(UPDATED)
    report.updated = int(updated)
