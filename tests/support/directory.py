"""The example directory loaded into a daemon's database in-process: the CLI tests that only
need its data skip one `omniroute` start per CSV (about a second each); the import command
itself is tested through the real CLI in tests/test_cli_directory.py."""

import asyncio
import atexit
import shutil
import tempfile
import threading
import tomllib
from pathlib import Path

from routers.csv.importer import import_csv
from routers.store.engine import create_engine, migrate

EXAMPLES = Path(__file__).resolve().parents[2] / "config" / "examples"
KINDS = ("teams", "agents", "customers", "holidays")


def load_examples(config: Path, kinds: tuple[str, ...] = KINDS) -> None:
    """Migrate the database ``config`` names and import the example ``kinds`` into it, as
    ``omniroute directory migrate`` and ``import`` would (region TR, as the configs say)."""
    url = tomllib.loads(config.read_text(encoding="utf-8"))["database_url"]
    asyncio.run(_load(url, kinds))


async def _load(url: str, kinds: tuple[str, ...]) -> None:
    await migrated(url)
    engine = create_engine(url)
    try:
        for kind in kinds:
            report = await import_csv(
                engine, EXAMPLES / f"{kind}.csv", kind=kind, region="TR", dry_run=False
            )
            assert report.rejects == [], report.rejects
    finally:
        await engine.dispose()


_template: Path | None = None
_template_lock = threading.Lock()


async def migrated(url: str) -> None:
    """``migrate(url)``, except that a SQLite file not there yet becomes a copy of one the
    real migrations brought to the head revision once per process: a fresh directory of the
    same schema, without half a second of Alembic per test. The migrations themselves are
    tested in tests/test_migrations.py; the daemon and ``omniroute directory migrate`` still
    migrate for real in the tests that run them."""
    target = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    if target is None or target.exists():
        await migrate(url)
        return
    shutil.copyfile(await asyncio.to_thread(_migrated_template), target)


def _migrated_template() -> Path:
    global _template
    with _template_lock:
        if _template is None:
            folder = Path(tempfile.mkdtemp(prefix="omniroute-migrated-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            path = folder / "directory.db"
            asyncio.run(migrate(f"sqlite:///{path}"))  # in a thread of its own: a loop of its own
            # closed cleanly, SQLite folded its write-ahead log into the file: it is all of it
            assert not path.with_name(path.name + "-wal").exists()
            _template = path
        return _template
