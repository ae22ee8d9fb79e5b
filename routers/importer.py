"""CSV import and export of the directory: teams, agents and customers with their identities.

Sole purpose: load an operator's directory file of any size into the database, applying
every valid row and naming every rejected one by line and reason, without ever moving an
identity from one customer to another behind the operator's back.

Invariants:
- The file is streamed in batches of ``BATCH`` rows; each batch is parsed in a worker
  thread and applied in one transaction, so a failed batch leaves no half-applied row and
  memory stays bounded whatever the file's size (only the rejected rows are kept).
- Ids already seen in the file live in a temporary table on the import's own connection,
  not in memory; identities claimed by earlier rows are found in the database itself.
- ``dry_run`` runs the very same code inside one transaction that is rolled back, so it
  reports exactly what a real import would, including conflicts within the file.
- A customer row replaces that customer's identity set; an identity owned by another
  customer rejects the row.
"""

import asyncio
import csv
import os
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from sqlalchemy import Table, delete, insert, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ingest.errors import OmnirouteError
from ingest.identities import (
    InvalidIdentity,
    normalise_email,
    normalise_phone,
    normalise_twitter,
)
from routers.models import Agent, Customer, CustomerIdentity, Team
from routers.sql import upsert

BATCH = 5_000
PARALLEL_BYTES = 16 * 2**20  # below this, spawning worker processes costs more than it saves
CHUNK = 1_000  # rows per statement: keeps bound parameters far below SQLite's and asyncpg's limits

COLUMNS: dict[str, tuple[str, ...]] = {
    "teams": ("id", "name", "dial", "email"),
    "agents": ("id", "name", "team", "email", "phone", "dial", "active"),
    "customers": ("id", "name", "team", "emails", "phones", "twitter"),
}
IDENTITY_COLUMNS = (("emails", "email"), ("phones", "phone"), ("twitter", "twitter"))
_DIAL = re.compile(r"[A-Za-z0-9+:@._/-]{1,128}")  # nothing a PBX dialplan could interpret
_TRUE = {"", "true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_LIMITS = {"id": 200, "name": 400, "email": 400, "phone": 100}
_ADDRESS_LIMIT = 512

_teams: Table = Team.__table__  # type: ignore[assignment]
_agents: Table = Agent.__table__  # type: ignore[assignment]
_customers: Table = Customer.__table__  # type: ignore[assignment]
_identities: Table = CustomerIdentity.__table__  # type: ignore[assignment]

Identity = tuple[str, str]  # (kind, normalised address)


class ImportFileError(OmnirouteError):
    """The file as a whole cannot be imported (no header, unknown columns, unknown kind)."""


class ImportAborted(OmnirouteError):
    """The database failed a batch; that batch was rolled back, earlier ones stay applied
    (none in a dry run). ``report`` holds what was applied before it."""

    def __init__(self, message: str, report: "ImportReport") -> None:
        super().__init__(message)
        self.report = report


class Rejected(NamedTuple):
    line: int
    reason: str


@dataclass
class ImportReport:
    """What an import did (or, in a dry run, would do). ``rejects`` is sorted by line."""

    kind: str
    dry_run: bool
    inserted: int = 0
    updated: int = 0
    identities_added: int = 0
    identities_removed: int = 0
    rows: int = 0  # data rows read, blank lines excluded
    rejects: list[Rejected] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        return len(self.rejects)


@dataclass
class _Row:
    line: int
    id: str | None
    values: dict[str, Any] = field(default_factory=dict)
    identities: frozenset[Identity] = frozenset()
    error: str | None = None


class _Reject(Exception):
    pass


# --- parsing (runs in a worker thread) -------------------------------------------------


def _header(reader: Iterator[list[str]], kind: str | None) -> tuple[str, list[str]]:
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise ImportFileError("the file is empty: expected a header row") from None
    if len(set(header)) != len(header):
        raise ImportFileError(f"duplicate column in header: {','.join(header)}")
    if kind is None:
        found = [k for k, cols in COLUMNS.items() if set(cols) == set(header)]
        if not found:
            raise ImportFileError(
                f"header {','.join(header)!r} matches no kind; expected one of: "
                + "; ".join(f"{k}: {','.join(c)}" for k, c in COLUMNS.items())
            )
        kind = found[0]
    elif kind not in COLUMNS:
        raise ImportFileError(f"unknown kind {kind!r}; expected one of {', '.join(COLUMNS)}")
    missing = [c for c in COLUMNS[kind] if c not in header]
    unknown = [c for c in header if c not in COLUMNS[kind]]
    if missing or unknown:
        raise ImportFileError(
            f"{kind} header must be {','.join(COLUMNS[kind])}"
            + (f"; missing {','.join(missing)}" if missing else "")
            + (f"; unknown {','.join(unknown)}" if unknown else "")
        )
    return kind, header


def _text(record: dict[str, str], column: str) -> str | None:
    value = record[column].strip()
    if not value:
        return None
    limit = _LIMITS.get(column)
    if limit is not None and len(value) > limit:
        raise _Reject(f"{column} longer than {limit} characters")
    return value


def _dial(value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    if not _DIAL.fullmatch(value):
        raise _Reject(
            f"bad dial target {value[:140]!r}: only letters, digits and + : @ . _ / - "
            "are allowed, at most 128 characters"
        )
    return value


def _email(value: str) -> str:
    try:
        address = normalise_email(value)
    except InvalidIdentity:
        raise _Reject(f"bad email {value.strip()!r}") from None
    if len(address) > _LIMITS["email"]:
        raise _Reject(f"email longer than {_LIMITS['email']} characters")
    return address


def _phone(value: str, region: str) -> str:
    try:
        number = normalise_phone(value, region)
    except InvalidIdentity:
        raise _Reject(f"bad phone number {value.strip()!r}") from None
    # A directory phone is a dialable number or a SIP/client URI, never a sender name.
    if not number.startswith(("+", "sip:", "sips:", "client:")) or len(number) > _LIMITS["phone"]:
        raise _Reject(f"bad phone number {value.strip()!r}")
    return number


def _twitter(value: str) -> str:
    try:
        return normalise_twitter(value)
    except InvalidIdentity:
        raise _Reject(f"bad X handle or user id {value.strip()!r}") from None


def _parse_values(kind: str, record: dict[str, str], region: str) -> _Row:
    row = _Row(line=0, id=_text(record, "id"))
    name = _text(record, "name")
    if row.id is None:
        raise _Reject("missing id")
    if name is None:
        raise _Reject("missing name")
    row.values = {"id": row.id, "name": name}
    if kind == "teams":
        row.values["dial"] = _dial(record["dial"])
        row.values["email"] = _email(record["email"]) if record["email"].strip() else None
        return row
    row.values["team_id"] = _text(record, "team")
    if kind == "agents":
        active = record["active"].strip().lower()
        if active not in _TRUE | _FALSE:
            raise _Reject(f"bad active value {record['active'].strip()!r}: use true or false")
        row.values["active"] = active in _TRUE
        row.values["email"] = _email(record["email"]) if record["email"].strip() else None
        row.values["phone"] = _phone(record["phone"], region) if record["phone"].strip() else None
        row.values["dial"] = _dial(record["dial"])
        return row
    identities: set[Identity] = set()
    for column, identity_kind in IDENTITY_COLUMNS:
        for part in record[column].split(";"):
            if not part.strip():
                continue
            if identity_kind == "email":
                address = _email(part)
            elif identity_kind == "phone":
                address = _phone(part, region)
            else:
                address = _twitter(part)
            if len(address) > _ADDRESS_LIMIT:
                raise _Reject(f"{identity_kind} longer than {_ADDRESS_LIMIT} characters")
            identities.add((identity_kind, address))
    row.identities = frozenset(identities)
    return row


def _parse_row(kind: str, header: list[str], fields: list[str], line: int, region: str) -> _Row:
    if len(fields) != len(header):
        return _Row(line, None, error=f"{len(fields)} fields, expected {len(header)}")
    record = dict(zip(header, fields, strict=True))
    row_id = record["id"].strip() or None
    for value in fields:
        if "\x00" in value:
            return _Row(line, row_id, error="contains a NUL character")
        if any("\udc80" <= c <= "\udcff" for c in value):  # surrogateescape'd bytes
            return _Row(line, row_id, error="not valid UTF-8")
    try:
        row = _parse_values(kind, record, region)
    except _Reject as exc:
        return _Row(
            line, row_id if row_id and len(row_id) <= _LIMITS["id"] else None, error=str(exc)
        )
    row.line = line
    return row


def _parse_batch(
    kind: str, header: list[str], region: str, records: list[tuple[int, list[str] | str]]
) -> list[_Row]:
    """Normalise one batch; a pure function, so it can run in a worker process."""
    return [
        _Row(line, None, error=r)
        if isinstance(r, str)
        else _parse_row(kind, header, r, line, region)
        for line, r in records
    ]


class _Source:
    """A CSV file read batch by batch; line numbers count physical lines, header = 1."""

    def __init__(self, path: Path, kind: str | None, region: str) -> None:
        # utf-8-sig drops a BOM; surrogateescape lets one bad line be rejected, not the file.
        self._file = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
        self._reader = csv.reader(self._file)
        try:
            self.kind, self.header = _header(self._reader, kind)
        except (ImportFileError, csv.Error):
            self._file.close()
            raise

    def records(self, size: int) -> list[tuple[int, list[str] | str]]:
        """The next ``size`` non-blank records with their first line, or the csv error."""
        out: list[tuple[int, list[str] | str]] = []
        while len(out) < size:
            line = self._reader.line_num + 1
            try:
                fields = next(self._reader)
            except StopIteration:
                break
            except csv.Error as exc:
                out.append((line, f"unreadable CSV: {exc}"))
                continue
            if fields and (len(fields) > 1 or fields[0].strip()):
                out.append((line, fields))
        return out

    def close(self) -> None:
        self._file.close()


# --- applying a batch (one transaction) --------------------------------------------------


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


class _Applier:
    """Applies parsed rows of one kind; ``seen`` is the temporary table of ids in the file."""

    def __init__(self, kind: str, seen: Table, report: ImportReport) -> None:
        self.kind = kind
        self.seen = seen
        self.report = report
        self.table = {"teams": _teams, "agents": _agents, "customers": _customers}[kind]
        self.tables = [self.table, seen] + ([_identities] if kind == "customers" else [])

    async def apply(self, session: AsyncSession, rows: list[_Row]) -> list[Rejected]:
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
        good: list[_Row] = []
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
            teams = {t for (t,) in await _select_in(session, [_teams.c.id], _teams.c.id, wanted)}
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
        ident = _identities.c
        for identity_kind in ("email", "phone", "twitter"):
            gone = [a for k, a in removed if k == identity_kind]
            for chunk in _chunks(gone):
                await session.execute(
                    delete(_identities).where(ident.kind == identity_kind, ident.address.in_(chunk))
                )
        for chunk in _chunks(added):
            await session.execute(insert(_identities), chunk)
        self.report.updated += sum(1 for i in ids if i in existing)
        self.report.inserted += sum(1 for i in ids if i not in existing)
        self.report.identities_added += len(added)
        self.report.identities_removed += len(removed)
        return rejects

    async def _claims(
        self, session: AsyncSession, rows: list[_Row], rejects: list[Rejected]
    ) -> tuple[list[_Row], list[dict[str, str]], list[Identity]]:
        """Reject rows claiming an identity another customer owns; diff the others' sets.

        Ownership is read for the batch's addresses and the batch's customers at once, then
        updated row by row, so an identity released by an earlier row may be claimed later.
        Returns the accepted rows, the identities to add and the identities to remove.
        """
        ident = _identities.c
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

        good: list[_Row] = []
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


async def _seen_table(conn: AsyncConnection) -> Table:
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
) -> ImportReport:
    """Import ``path`` (kind from its header unless ``kind`` is given); see the module doc.

    Raises ``ImportFileError`` when the file cannot be read as a directory CSV at all, and
    ``ImportAborted`` when the database fails a batch. ``progress`` gets the running report
    after every batch. ``workers`` processes normalise batches ahead of the database (phone
    parsing dominates); ``None`` uses one per CPU for files over ``PARALLEL_BYTES``, 0 a
    thread. Worker processes are spawned, so a calling script needs a ``__main__`` guard.
    """
    source = await asyncio.to_thread(_Source, path, kind, region)
    if workers is None:
        size = (await asyncio.to_thread(path.stat)).st_size
        workers = (os.cpu_count() or 1) if size > PARALLEL_BYTES else 0
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers else None
    report = ImportReport(kind=source.kind, dry_run=dry_run)
    try:
        async with engine.connect() as conn:
            seen = await _seen_table(conn)
            try:
                outer = await conn.begin() if dry_run else None
                async with AsyncSession(bind=conn, expire_on_commit=False) as session:
                    await _run(
                        session,
                        source,
                        _Applier(source.kind, seen, report),
                        region,
                        pool,
                        batch_size,
                        max(workers, 1) + 1,
                        progress,
                    )
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
    source: _Source,
    applier: _Applier,
    region: str,
    pool: ProcessPoolExecutor | None,
    batch_size: int,
    depth: int,
    progress: Callable[[ImportReport], None] | None,
) -> None:
    """Keep ``depth`` batches parsing ahead while applying them in file order."""
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[list[_Row]]] = deque()
    report = applier.report
    postgres = session.bind is not None and session.bind.dialect.name == "postgresql"
    eof = False
    batches = 0
    try:
        while True:
            while not eof and len(pending) < depth:
                records = await asyncio.to_thread(source.records, batch_size)
                eof = not records
                if records:
                    pending.append(
                        loop.run_in_executor(
                            pool, _parse_batch, source.kind, source.header, region, records
                        )
                    )
            if not pending:
                return
            rows = await pending.popleft()
            try:
                async with session.begin():
                    rejects = await applier.apply(session, rows)
                    batches += 1
                    if postgres and batches & (batches - 1) == 0:
                        # The tables grow faster than autovacuum re-analyzes them (temporary
                        # tables never are): on stale statistics the planner filters whole
                        # tables for each IN lookup, which is quadratic. Analyze at batches
                        # 1, 2, 4, 8...: log(n) cheap sampled passes.
                        for table in applier.tables:
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
    finally:
        for future in pending:
            future.cancel()


# --- export ------------------------------------------------------------------------------


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
    table = {"teams": _teams, "agents": _agents, "customers": _customers}[kind]
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
                ident = _identities.c
                result = await conn.execute(
                    select(ident.customer_id, ident.kind, ident.address)
                    .where(ident.customer_id.in_([r["id"] for r in page]))
                    .order_by(ident.customer_id, ident.kind, ident.address)
                )
                for customer_id, identity_kind, address in result.all():
                    held.setdefault(customer_id, {}).setdefault(identity_kind, []).append(address)
        if not page:
            return written
        lines = [_export_row(kind, row, held.get(row["id"], {})) for row in page]
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
