"""The migrations build exactly the tables the models describe, on SQLite and PostgreSQL,
and a directory of the first schema upgrades in place with its rows kept."""

from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from routers.models import Base
from routers.store.engine import create_engine, current_revision, migrate


def _differences(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_migrations_match_the_models(db: AsyncEngine) -> None:
    async with db.connect() as connection:
        assert await connection.run_sync(_differences) == []


async def test_a_first_schema_directory_upgrades_with_its_rows(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await migrate(url, "0001")
    engine = create_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(
                sa.text("INSERT INTO teams (id, name) VALUES ('billing', 'Billing')")
            )
            await connection.execute(
                sa.text(
                    "INSERT INTO agents (id, name, team_id, active) "
                    "VALUES ('ana', 'Ana', 'billing', 1)"
                )
            )
        await migrate(url)
        assert await current_revision(url) == "0005"
        async with engine.connect() as connection:
            team = (
                await connection.execute(
                    sa.text("SELECT id, hours, timezone, first_response, escalate_to FROM teams")
                )
            ).one()
            agent = (
                await connection.execute(sa.text("SELECT id, deputy, capacity FROM agents"))
            ).one()
        assert tuple(team) == ("billing", None, None, None, None)
        assert tuple(agent) == ("ana", None, None)
    finally:
        await engine.dispose()
