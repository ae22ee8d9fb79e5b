"""A small directory written through omniroute's own tables, for tests that need customers
before the importer's own tests have proven it."""

from sqlalchemy.ext.asyncio import AsyncEngine

from routers.models import Agent, Customer, CustomerIdentity, Team
from routers.store.engine import create_engine, sessionmaker
from tests.support import directory


async def seed(engine: AsyncEngine) -> None:
    async with sessionmaker(engine).begin() as session:
        session.add_all(
            [
                Team(id="billing", name="Billing", dial="+902125550100", email="billing@x.test"),
                Team(id="network", name="Network", dial="sip:network@pbx.test", email=None),
            ]
        )
        await session.flush()
        session.add_all(
            [
                Agent(id="ana", name="Ana", team_id="billing", dial="client:ana", active=True),
                Agent(id="bob", name="Bob", team_id="network", dial="+902125550111", active=True),
                Customer(id="acme", name="Acme Ltd", team_id="billing"),
                Customer(id="globex", name="Globex", team_id="network"),
            ]
        )
        await session.flush()
        session.add_all(
            [
                CustomerIdentity(kind="email", address="ayse@acme.test", customer_id="acme"),
                CustomerIdentity(kind="phone", address="+905321112233", customer_id="acme"),
                CustomerIdentity(kind="twitter", address="acmeltd", customer_id="acme"),
                CustomerIdentity(kind="email", address="it@globex.test", customer_id="globex"),
            ]
        )


async def seeded(url: str) -> None:
    """Migrate the directory at ``url`` and seed it (the daemon-process tests' set-up)."""
    await directory.migrated(url)
    engine = create_engine(url)
    try:
        await seed(engine)
    finally:
        await engine.dispose()
