"""The example directory loaded into a daemon's database in-process: the CLI tests that only
need its data skip one `omniroute` start per CSV (about a second each); the import command
itself is tested through the real CLI in tests/test_cli_directory.py."""

import asyncio
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
    await migrate(url)
    engine = create_engine(url)
    try:
        for kind in kinds:
            report = await import_csv(
                engine, EXAMPLES / f"{kind}.csv", kind=kind, region="TR", dry_run=False
            )
            assert report.rejects == [], report.rejects
    finally:
        await engine.dispose()
