"""Writing a directory import of teams, agents or holidays to the database: one batch of
parsed rows, one transaction (customers, the big file, are ``routers.csv.bulk``'s).

Sole purpose: apply the rows ``routers.csv.format`` accepted, rejecting those that clash
with the file or the database (an id seen earlier in the file, an unknown team, a loop of
escalations).

Invariants:
- Ids already seen in the file live in a temporary table on the import's own connection
  (``seen_table``), not in memory.
- A row updates only the columns its file has (an old header leaves issue 15's as they
  are).
- A team's ``after_hours`` and ``escalate_to`` teams and an agent's ``deputy`` exist when
  the row is applied: in the directory, in the same batch, or further down the file (such
  rows wait in memory for ``finish``; only they do). ``escalate_to agent:<id>`` is not
  checked here (agents are imported after teams): the timer worker says when it is wrong.
- A chain of ``escalate_to`` teams never loops: a row that would close a loop, with the
  directory as stored and the rows applied before it, is rejected.
- holidays.csv is the whole calendar of each team it has an accepted row for: ``finish``
  removes that team's company days the file does not name (a rejected row's date stays).
"""

import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Table, delete, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from routers.csv.format import Row, holiday_key
from routers.csv.report import ImportReport, Rejected
from routers.models import Agent, CompanyHoliday, Customer, CustomerIdentity, Team
from routers.store.sql import upsert

CHUNK = 1_000  # rows per statement: keeps bound parameters far below SQLite's and asyncpg's limits

TEAMS: Table = Team.__table__  # type: ignore[assignment]
HOLIDAYS: Table = CompanyHoliday.__table__  # type: ignore[assignment]
IDENTITIES: Table = CustomerIdentity.__table__  # type: ignore[assignment]
#: the table each kind of row is stored in
TABLES: dict[str, Table] = {
    "teams": TEAMS,
    "agents": Agent.__table__,  # type: ignore[dict-item]
    "customers": Customer.__table__,  # type: ignore[dict-item]
    "holidays": HOLIDAYS,
}
#: the columns naming another row of the same kind, and what the operator calls them
REFERENCES = {
    "teams": (("after_hours", "after_hours team"), ("escalate_to", "escalate_to team")),
    "agents": (("deputy", "deputy"),),
}


def _names(kind: str, row: Row) -> Iterator[tuple[str, str]]:
    """The rows of its own kind a row names: (column, id)."""
    for column, _ in REFERENCES[kind]:
        target = row.values.get(column)
        if target is not None and not (column == "escalate_to" and target.startswith("agent:")):
            yield column, target


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
        self.tables = [self.table, seen]
        #: rows naming an after_hours team or deputy not known yet (see the module doc)
        self.waiting: list[Row] = []
        #: holidays: the teams with an accepted row, whose calendar the file replaces
        self.calendars: set[str] = set()

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
                    rejects.append(Rejected(row.line, _duplicate(row.id, first, self.kind)))
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
        if self.kind in REFERENCES:
            good = await self._known(session, good)
        if self.kind == "teams":
            good = await self._no_loops(session, good, rejects)
        if self.kind == "holidays":
            self.calendars.update(r.values["team_id"] for r in good)

        await self._store(session, good)
        return rejects

    async def finish(self, session: AsyncSession) -> list[Rejected]:
        """After the last batch: apply the rows that waited for a team or agent named
        further down the file (rejecting those it never defined), and drop the company
        days the holidays file no longer lists."""
        rejects: list[Rejected] = []
        if self.waiting:
            rows, self.waiting = self.waiting, []
            good = await self._known(session, rows, last=True)
            applied = {r.id for r in good}
            labels, table = dict(REFERENCES[self.kind]), self.table
            named = {t for r in rows for _, t in _names(self.kind, r)}
            stored = {i for (i,) in await _select_in(session, [table.c.id], table.c.id, named)}
            for row in rows:
                if row.id not in applied:
                    names = list(_names(self.kind, row))
                    column, target = next(
                        ((c, t) for c, t in names if t not in stored | applied), names[0]
                    )
                    why = f"unknown {labels[column]} {target!r}: not in the file or the directory"
                    rejects.append(Rejected(row.line, why))
            if self.kind == "teams":
                good = await self._no_loops(session, good, rejects)
            await self._store(session, good)
        if self.calendars:
            await self._drop_unlisted(session)
        return rejects

    async def _store(self, session: AsyncSession, rows: list[Row]) -> None:
        """Insert the new rows, update the existing ones that differ (only the columns
        given): an unchanged file re-imported reports 0 updated and writes nothing."""
        if self.kind == "holidays":
            h = HOLIDAYS.c
            found = await _select_in(
                session, [HOLIDAYS], h.team_id, (r.values["team_id"] for r in rows)
            )
            stored = {holiday_key(f.team_id, f.day): f._mapping for f in found}
            keys = ["team_id", "day"]
        else:
            found = await _select_in(session, [self.table], self.table.c.id, [r.id for r in rows])
            stored = {f.id: f._mapping for f in found}
            keys = ["id"]
        new = [r.values for r in rows if r.id not in stored]
        changed = [
            r.values
            for r in rows
            if (was := stored.get(r.id or "")) is not None
            and any(was[column] != value for column, value in r.values.items())
        ]
        # New rows go through one executemany INSERT (compiled once; a row created meanwhile
        # fails the batch loudly); changed ones through the upsert, which compiles per call.
        for chunk in _chunks(new):
            await session.execute(insert(self.table), chunk)
        for chunk in _chunks(changed):
            await upsert(session, self.table, chunk, keys)
        self.report.updated += len(changed)
        self.report.inserted += len(new)

    async def _known(
        self, session: AsyncSession, rows: list[Row], *, last: bool = False
    ) -> list[Row]:
        """The rows whose after_hours team or deputy exists, in the directory or among
        these rows (themselves kept, so never a dangling name); the others wait for
        ``finish`` unless this is it (``last``)."""
        naming: dict[str, list[Row]] = {}  # name -> the rows naming it
        for row in rows:
            for _, target in _names(self.kind, row):
                naming.setdefault(target, []).append(row)
        table = self.table
        known = {i for (i,) in await _select_in(session, [table.c.id], table.c.id, naming)}
        found = known | {r.id for r in rows}
        # Rows naming what is neither stored nor here wait, and so does every row naming a
        # waiting row that is not stored yet (a chain of deputies), transitively.
        stack = [r for name, rs in naming.items() if name not in found for r in rs]
        wait: set[str | None] = set()
        while stack:
            row = stack.pop()
            if row.id not in wait:
                wait.add(row.id)
                if row.id not in known:
                    stack += naming.get(row.id or "", [])
        if not last:
            self.waiting += [r for r in rows if r.id in wait]
        return [r for r in rows if r.id not in wait]

    async def _no_loops(
        self, session: AsyncSession, rows: list[Row], rejects: list[Rejected]
    ) -> list[Row]:
        """The rows whose ``escalate_to`` chain ends, with the directory as stored and the
        rows before them applied; the others are rejected with the loop they would close.
        Teams are few: the whole chain table is read."""
        if not any("escalate_to" in r.values for r in rows):
            return rows
        chain = {
            team: target
            for team, target in (await session.execute(select(TEAMS.c.id, TEAMS.c.escalate_to)))
            if target is not None and not target.startswith("agent:")
        }
        good: list[Row] = []
        for row in rows:
            assert row.id is not None
            target = row.values.get("escalate_to", chain.get(row.id))
            path = [row.id]
            while target is not None and not target.startswith("agent:") and target not in path:
                path.append(target)
                target = chain.get(target)
            if target == row.id:
                loop = " -> ".join([*path, row.id])
                rejects.append(Rejected(row.line, f"escalate_to loops: {loop}"))
                continue
            if "escalate_to" in row.values:
                if (value := row.values["escalate_to"]) and not value.startswith("agent:"):
                    chain[row.id] = value
                else:
                    chain.pop(row.id, None)
            good.append(row)
        return good

    async def _drop_unlisted(self, session: AsyncSession) -> None:
        h = HOLIDAYS.c
        found = await _select_in(session, [h.team_id, h.day], h.team_id, self.calendars)
        stored = {holiday_key(team, day): (team, day) for team, day in found}
        seen = self.seen.c
        listed = {k for (k,) in await _select_in(session, [seen.id], seen.id, stored)}
        gone: dict[str, list[Any]] = {}
        for key, (team, day) in stored.items():
            if key not in listed:
                gone.setdefault(team, []).append(day)
        for team, days in gone.items():
            await session.execute(delete(HOLIDAYS).where(h.team_id == team, h.day.in_(days)))
        self.report.removed += sum(len(days) for days in gone.values())


async def seen_table(conn: AsyncConnection) -> Table:
    from sqlalchemy import Column, Integer, MetaData, String

    name = f"omniroute_import_{uuid.uuid4().hex[:12]}"
    table = Table(
        name,
        MetaData(),
        Column("id", String(240), primary_key=True),  # a holiday's key: date, space, team
        Column("line", Integer, nullable=False),
        prefixes=["TEMPORARY"],
    )
    await conn.run_sync(table.create)
    await conn.commit()
    return table


def _duplicate(key: str, first: int, kind: str) -> str:
    if kind == "holidays":
        day, _, team = key.partition(" ")
        return f"duplicate date {day} for team {team!r} (first on line {first})"
    return f"duplicate id {key!r} (first on line {first})"
