"""The directory CSV format: its kinds and columns, and each row read and validated.

Sole purpose: turn an operator's file, batch by batch, into rows the database can take
(identities normalised: phones to E.164, emails and X handles as ``ingest.identities``
stores them; issue 15's hours, zones and capacities as ``routers.csv.columns`` writes them)
or into a reason each row is rejected, named by its line. A bad row never rejects the file;
only a header that fits no kind does (``ImportFileError``).

Issue 15's columns are optional ("Old headers keep importing", DESIGN.md): a header is a
kind's when it has all of ``REQUIRED[kind]`` and nothing outside ``COLUMNS[kind]``, and a
row carries only the columns its header has, so an old file leaves the others as they are.

``parse_batch`` is a pure function of its arguments, so it can run in a worker process.

The file itself (encoding, delimiter, header) is ``routers.csv.source``'s; a row whose
bytes are not of the file's encoding is rejected naming the encoding it looks like.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from typing import Any, TypeVar

from ingest.errors import OmnirouteError
from ingest.identities import (
    InvalidIdentity,
    hidden_character,
    normalise_email,
    normalise_phone,
    normalise_twitter,
)
from routers.csv import columns

BATCH = 5_000  # rows read, parsed and written (or exported) at a time

#: every column of each kind, in the order export writes them
COLUMNS: dict[str, tuple[str, ...]] = {
    "teams": (
        *("id", "name", "dial", "email"),
        *("timezone", "hours", "holidays", "after_hours", "after_hours_dial"),
        *("first_response", "escalate_to"),
    ),
    "agents": (
        *("id", "name", "team", "email", "phone", "dial", "active"),
        *("deputy", "capacity", "hours"),
    ),
    "customers": ("id", "name", "team", "emails", "phones", "twitter", "language"),
    "holidays": ("team", "date", "name", "hours"),
}
#: the columns a header must have; the others are issue 15's and 16's, optional
REQUIRED: dict[str, tuple[str, ...]] = {
    "teams": COLUMNS["teams"][:4],
    "agents": COLUMNS["agents"][:7],
    "customers": COLUMNS["customers"][:6],
    "holidays": COLUMNS["holidays"][:3],
}
IDENTITY_COLUMNS = (("emails", "email"), ("phones", "phone"), ("twitter", "twitter"))
_DIAL = re.compile(r"[A-Za-z0-9+:@._/-]{1,128}")  # nothing a PBX dialplan could interpret
_TRUE = {"", "true", "1", "yes"}
_FALSE = {"false", "0", "no"}
_LIMITS = {"id": 200, "name": 400, "email": 400, "phone": 100}
_LIMITS |= {"team": 200, "after_hours": 200, "deputy": 200, "holiday": 200, "escalate_to": 200}
_ADDRESS_LIMIT = 512
# OWASP's CSV-injection rule: a spreadsheet runs a cell starting with one of these as a
# formula. Export prefixes such a cell (and one that already starts with quotes before one
# of them, so that the escape can be undone exactly) with "'"; import strips that quote.
_FORMULA = re.compile(r"'*[=+\-@\t\r]")
_ESCAPED = re.compile(r"'+[=+\-@\t\r]")
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes not of the encoding, surrogateescape'd

Identity = tuple[str, str]  # (kind, normalised address)


class ImportFileError(OmnirouteError):
    """The file as a whole cannot be imported (no header, unknown columns, unknown kind)."""


@dataclass
class Row:
    line: int
    id: str | None
    values: dict[str, Any] = field(default_factory=dict)
    identities: frozenset[Identity] = frozenset()
    error: str | None = None


class _Reject(Exception):
    pass


def escape_cell(value: str) -> str:
    """The cell as export writes it: never a formula when a spreadsheet opens the file
    (``+905321112233`` becomes ``'+905321112233``)."""
    return "'" + value if _FORMULA.match(value) else value


def unescape_cell(value: str) -> str:
    """The cell as ``escape_cell`` received it; a spreadsheet's ``'`` marker goes too."""
    return value[1:] if _ESCAPED.match(value) else value


def columns_of(kind: str) -> str:
    """A kind's header as the error messages spell it: ``team,date,name (optional:
    hours)``."""
    optional = [c for c in COLUMNS[kind] if c not in REQUIRED[kind]]
    return ",".join(REQUIRED[kind]) + (f" (optional: {','.join(optional)})" if optional else "")


def holiday_key(team: str, day: date) -> str:
    """A holidays.csv row's identity (its team and date) as one key, date first: team ids
    are free text, the date's length is fixed."""
    return f"{day.isoformat()} {team}"


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


def _bad(what: str, value: str) -> _Reject:
    """The row's rejection, naming an invisible character when that is what is wrong: the
    operator cannot see it in the file."""
    hidden = hidden_character(value.strip())
    why = f": contains an invisible character ({hidden})" if hidden else ""
    return _Reject(f"bad {what} {value.strip()!r}{why}")


def _email(value: str) -> str:
    try:
        address = normalise_email(value)
    except InvalidIdentity:
        raise _bad("email", value) from None
    if len(address) > _LIMITS["email"]:
        raise _Reject(f"email longer than {_LIMITS['email']} characters")
    return address


def _phone(value: str, region: str) -> str:
    try:
        number = normalise_phone(value, region)
    except InvalidIdentity:
        raise _bad("phone number", value) from None
    # A directory phone is a dialable number or a SIP/client URI, never a sender name.
    if not number.startswith(("+", "sip:", "sips:", "client:")) or len(number) > _LIMITS["phone"]:
        raise _Reject(f"bad phone number {value.strip()!r}")
    return number


def _twitter(value: str) -> str:
    try:
        return normalise_twitter(value)
    except InvalidIdentity:
        raise _bad("X handle or user id", value) from None


_T = TypeVar("_T")


def _checked(check: Callable[[str], _T], value: str) -> _T:
    try:
        return check(value)
    except ValueError as exc:  # routers.csv.columns' one-line message for the operator
        raise _Reject(str(exc)) from None


def _issue15(row: Row, record: dict[str, str], kind: str) -> None:
    """A team's or agent's issue 15 columns, those its header has; a team's after-hours team
    and an agent's deputy are someone else (whether they exist, the writer checks)."""
    checks: dict[str, Callable[[str], str | None]] = {"hours": columns.hours}
    if kind == "teams":
        checks |= {
            "timezone": columns.timezone,
            "holidays": columns.country,
            "after_hours_dial": _dial,
            "first_response": columns.first_response,
            "escalate_to": columns.escalate_to,
        }
    else:
        checks["capacity"] = columns.capacity
    for column, check in checks.items():
        if column in record:
            row.values[column] = _checked(check, record[column])
    column, who = (
        ("after_hours", "team itself") if kind == "teams" else ("deputy", "agent themself")
    )
    if column in record:
        target = row.values[column] = _text(record, column)
        if target is not None and target == row.id:
            raise _Reject(f"{column} {target!r} is the {who}")
    if row.values.get("escalate_to") == row.id:
        raise _Reject(f"escalate_to {row.id!r} is the team itself")


def _parse_holiday(record: dict[str, str]) -> Row:
    team = _text(record, "team")
    if team is None:
        raise _Reject("missing team")
    day = _checked(columns.day, record["date"])
    name = record["name"].strip()
    if not name:
        raise _Reject("missing name")
    if len(name) > _LIMITS["holiday"]:
        raise _Reject(f"name longer than {_LIMITS['holiday']} characters")
    values: dict[str, Any] = {"team_id": team, "day": day, "name": name}
    if "hours" in record:
        values["hours"] = _checked(columns.spans, record["hours"])
    return Row(line=0, id=holiday_key(team, day), values=values)


def _parse_values(kind: str, record: dict[str, str], region: str) -> Row:
    if kind == "holidays":
        return _parse_holiday(record)
    row = Row(line=0, id=_text(record, "id"))
    name = _text(record, "name")
    if row.id is None:
        raise _Reject("missing id")
    if name is None:
        raise _Reject("missing name")
    row.values = {"id": row.id, "name": name}
    if kind == "teams":
        row.values["dial"] = _dial(record["dial"])
        row.values["email"] = _email(record["email"]) if record["email"].strip() else None
        _issue15(row, record, kind)
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
        _issue15(row, record, kind)
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
    if "language" in record:
        row.values["language"] = _checked(columns.language, record["language"])
    return row


def _key(kind: str, record: dict[str, str]) -> str | None:
    """The row's identity for duplicate detection, even when the row is rejected; None when
    there is none that could be stored (too long, a NUL, undecodable bytes)."""
    if kind == "holidays":
        team = record["team"].strip()
        try:
            key = holiday_key(team, columns.day(record["date"])) if team else None
        except ValueError:
            return None
        limit = _LIMITS["team"]
    else:
        key, team, limit = record["id"].strip() or None, record["id"].strip(), _LIMITS["id"]
    if key is None or len(team) > limit or "\x00" in key:
        return None
    return None if _UNDECODABLE.search(key) else key


def _parse_row(kind: str, header: list[str], fields: list[str], line: int, region: str) -> Row:
    if len(fields) != len(header):
        return Row(line, None, error=f"{len(fields)} fields, expected {len(header)}")
    fields = [unescape_cell(value) for value in fields]
    record = dict(zip(header, fields, strict=True))
    row_id = _key(kind, record)
    for value in fields:
        if "\x00" in value:
            return Row(line, row_id, error="contains a NUL character")
        if _UNDECODABLE.search(value):
            return Row(line, row_id, error="not valid UTF-8" + _likely_encoding(fields))
    try:
        row = _parse_values(kind, record, region)
    except _Reject as exc:
        return Row(line, row_id, error=str(exc))
    row.line = line
    return row


#: letters a Turkish text has that ASCII has not, as Windows-1254 writes them
_TURKISH = frozenset("ğĞıİşŞçÇöÖüÜ")


def _likely_encoding(fields: list[str]) -> str:
    """What a row's undecodable bytes look like: Windows-1254 when read so they are Turkish
    letters (a Turkish Excel's "CSV"), else a hint at ``--encoding``."""
    raw = b"".join(value.encode("utf-8", "surrogateescape") for value in fields)
    if set(raw.decode("cp1254", "replace")) & _TURKISH:
        return ": looks like Windows-1254 (Turkish Excel): use --encoding cp1254"
    return ": give the file's encoding with --encoding"


def parse_batch(
    kind: str, header: list[str], region: str, records: list[tuple[int, list[str] | str]]
) -> list[Row]:
    """Normalise one batch; a pure function, so it can run in a worker process."""
    return [
        Row(line, None, error=r)
        if isinstance(r, str)
        else _parse_row(kind, header, r, line, region)
        for line, r in records
    ]
