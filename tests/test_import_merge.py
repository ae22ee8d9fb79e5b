"""The customers import's set-based merge (issue 18) against the row-by-row semantics it
replaced: random small files full of collisions (shared and released identities, repeated
ids, unknown teams, bad rows) give the same directory and the same report as a reference
that applies the rows one by one in file order, kept here, on SQLite and on PostgreSQL."""

import random
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from routers.csv.format import Identity, parse_batch
from routers.csv.importer import import_csv
from routers.models import Customer, CustomerIdentity, Team

IDS = [f"c{i}" for i in range(8)]
POOL: list[Identity] = [
    *(("email", f"e{i}@x.test") for i in range(6)),
    *(("phone", f"+9053211122{i:02d}") for i in range(4)),
    *(("twitter", f"h{i}") for i in range(3)),
]
SPELLING = {"email": lambda a: a.upper(), "phone": lambda a: a, "twitter": lambda a: "@" + a}


@dataclass
class Directory:
    customers: dict[str, tuple[str, str | None, str | None]] = field(default_factory=dict)
    owner: dict[Identity, str] = field(default_factory=dict)


@dataclass
class Outcome:
    inserted: int = 0
    updated: int = 0
    added: int = 0
    removed: int = 0
    rejects: list[tuple[int, str]] = field(default_factory=list)


def reference(
    directory: Directory, header: list[str], records: list[tuple[int, list[str]]]
) -> Outcome:
    """The importer before issue 18, one row at a time in file order."""
    out = Outcome()
    first: dict[str, int] = {}
    for row in parse_batch("customers", header, "TR", records):  # type: ignore[arg-type]
        if row.id is not None:
            if row.id in first:
                out.rejects.append(
                    (row.line, f"duplicate id {row.id!r} (first on line {first[row.id]})")
                )
                continue
            first[row.id] = row.line
        if row.error is not None:
            out.rejects.append((row.line, row.error))
            continue
        team = row.values["team_id"]
        if team is not None and team not in ("t1", "t2"):
            out.rejects.append((row.line, f"unknown team {team!r}"))
            continue
        who = row.id
        assert who is not None
        taken = sorted(i for i in row.identities if directory.owner.get(i, who) != who)
        if taken:
            kind, address = taken[0]
            reason = f"{kind} {address} is owned by customer {directory.owner[taken[0]]!r}"
            out.rejects.append((row.line, reason))
            continue
        before = {i for i, c in directory.owner.items() if c == who}
        stored = directory.customers.get(who)
        language = row.values.get("language", stored[2] if stored else None)
        new = (row.values["name"], team, language)
        if stored is None:
            out.inserted += 1
        elif stored != new or (before and before != row.identities):
            out.updated += 1
        directory.customers[who] = new
        for identity in before - row.identities:
            del directory.owner[identity]
            out.removed += 1
        for identity in row.identities - before:
            directory.owner[identity] = who
            out.added += 1
    return out


def random_case(rng: random.Random) -> tuple[Directory, list[str], list[tuple[int, list[str]]]]:
    directory = Directory()
    for who in rng.sample(IDS, rng.randrange(len(IDS))):
        directory.customers[who] = (
            rng.choice(["Ann", "Bo"]),
            rng.choice(["t1", "t2", None]),
            rng.choice([None, "tr"]),
        )
    owners = rng.sample(list(directory.customers), rng.randrange(len(directory.customers) + 1))
    share = rng.random()
    for identity in POOL:
        if owners and rng.random() < share:
            directory.owner[identity] = rng.choice(owners)
    header = ["id", "name", "team", "emails", "phones", "twitter"]
    if rng.random() < 0.5:
        header.append("language")
    records: list[tuple[int, list[str]]] = []
    line = 2
    for _ in range(rng.randrange(1, 14)):
        claimed = rng.sample(POOL, rng.randrange(4))
        cells = {"emails": [], "phones": [], "twitter": []}
        for kind, address in claimed:
            column = {"email": "emails", "phone": "phones", "twitter": "twitter"}[kind]
            cells[column].append(SPELLING[kind](address))
        if rng.random() < 0.08:
            cells["emails"].append("not-an-email")
        record = {
            "id": rng.choice([*IDS, ""]) if rng.random() < 0.05 else rng.choice(IDS),
            "name": rng.choice(["Ann", "Bo", "Bo", ""])
            if rng.random() < 0.1
            else rng.choice(["Ann", "Bo"]),
            "team": rng.choice(["t1", "t2", "", "nope"])
            if rng.random() < 0.2
            else rng.choice(["t1", "t2"]),
            "emails": ";".join(cells["emails"]),
            "phones": ";".join(cells["phones"]),
            "twitter": ";".join(cells["twitter"][:1]),
            "language": rng.choice(["", "tr", "en", "?"]),
        }
        records.append((line, [record[c] for c in header]))
        line += rng.choice([1, 1, 2])  # a blank line now and then
    return directory, header, records


async def seed(db: AsyncEngine, directory: Directory) -> None:
    async with db.begin() as conn:
        await conn.execute(delete(CustomerIdentity))
        await conn.execute(delete(Customer))
        for who, (name, team, language) in directory.customers.items():
            await conn.execute(
                insert(Customer).values(id=who, name=name, team_id=team, language=language)
            )
        for (kind, address), who in directory.owner.items():
            await conn.execute(
                insert(CustomerIdentity).values(kind=kind, address=address, customer_id=who)
            )


async def stored(db: AsyncEngine) -> Directory:
    async with db.connect() as conn:
        customers = {
            c.id: (c.name, c.team_id, c.language)
            for c in (await conn.execute(select(Customer))).all()
        }
        owner = {
            (i.kind, i.address): i.customer_id
            for i in (await conn.execute(select(CustomerIdentity))).all()
        }
    return Directory(customers, owner)


def write(path: Path, header: list[str], records: list[tuple[int, list[str]]]) -> None:
    lines = [",".join(header)]
    for line, fields in records:
        while len(lines) < line - 1:
            lines.append("")
        lines.append(",".join(f'"{f}"' if "," in f else f for f in fields))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def test_random_files_merge_as_row_by_row(db: AsyncEngine, tmp_path: Path) -> None:
    """Identity ownership decided in file order, duplicates, unknown teams and bad rows:
    the set-based merge agrees with the sequential reference on every count and reject."""
    async with db.begin() as conn:
        await conn.execute(insert(Team), [{"id": t, "name": t} for t in ("t1", "t2")])
    rng = random.Random(18)
    contested = 0
    for case in range(60):
        directory, header, records = random_case(rng)
        await seed(db, directory)
        path = tmp_path / f"{case}.csv"
        write(path, header, records)
        dry = await import_csv(db, path, kind="customers", region="TR", dry_run=True, batch_size=3)
        report = await import_csv(
            db, path, kind="customers", region="TR", dry_run=False, batch_size=3
        )
        expected = reference(directory, header, records)
        got = (report.inserted, report.updated, report.identities_added, report.identities_removed)
        assert got == (expected.inserted, expected.updated, expected.added, expected.removed), case
        assert [tuple(r) for r in report.rejects] == expected.rejects, case
        assert report.rows == len(records)
        assert (await stored(db)) == directory, case
        assert (dry.inserted, dry.updated, dry.rejects) == (
            report.inserted,
            report.updated,
            report.rejects,
        )
        contested += any("owned by" in reason for _, reason in expected.rejects)
    assert contested >= 10  # the cases did exercise ownership contests
