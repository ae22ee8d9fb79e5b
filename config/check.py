"""``omniroute check``: is the configuration valid and is everything it names reachable?
Prints a table; exits 1 when anything failed."""

import asyncio

from config.components import Wiring
from config.settings import Settings
from ingest.bus import Bus
from ingest.errors import OmnirouteError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.protocols import CheckRow
from ingest.topology import QUEUES
from routers.store.engine import create_engine, current_revision

Row = CheckRow


async def run_checks(settings: Settings) -> int:
    rows: list[Row] = [("config", True, "valid")]
    rows.append(await _check_broker(settings))
    rows.append(await _check_database(settings))
    if settings.routing.rules or settings.routing.shadow_rules:
        rows.append(await _check_rules(settings))
    rows.extend(await _check_connectors(settings))
    width = max(len(name) for name, _, _ in rows)
    for name, ok, why in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {why}")
    return 0 if all(ok for _, ok, _ in rows) else 1


async def _check_broker(settings: Settings) -> Row:
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-check")
    try:
        async with asyncio.timeout(settings.bus.connect_timeout + 5):
            await bus.open()
            depths = [f"{q}={(await bus.queue_depth(q))[0]}" for q in QUEUES]
        return ("broker", True, "topology declared; ready messages: " + ", ".join(depths))
    except (OmnirouteError, TimeoutError) as exc:
        return ("broker", False, str(exc) or type(exc).__name__)
    finally:
        await bus.close()


async def _check_database(settings: Settings) -> Row:
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        async with asyncio.timeout(settings.directory.statement_timeout + 5):
            revision = await current_revision(settings.directory_url)
        if revision is None:
            return (
                "directory",
                True,
                "reachable; not migrated yet (run: omniroute directory migrate)",
            )
        return ("directory", True, f"reachable; schema revision {revision}")
    except Exception as exc:  # any driver error is a failed check, reported in one line
        return ("directory", False, f"{type(exc).__name__}: {exc}")
    finally:
        await engine.dispose()


async def _check_rules(settings: Settings) -> Row:
    """Issue 20: the teams the topic rules name are in the directory."""
    from config.rules_cli import unknown_teams

    routing = settings.routing
    said = f"{len(routing.rules)} rules"
    if routing.shadow is not None:
        said += f", {len(routing.shadow.rules)} candidate rules ({routing.shadow_rules})"
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        problem = await unknown_teams(engine, routing)
    except Exception as exc:  # any driver error is a failed check, reported in one line
        return ("rules", False, f"{said}; teams not checked: {type(exc).__name__}: {exc}")
    finally:
        await engine.dispose()
    return ("rules", problem is None, problem or f"{said}; every team is in the directory")


async def _check_connectors(settings: Settings) -> list[Row]:
    """Each enabled channel's own check, in the registry's order: log into what it can
    reach (mailboxes, SMTP), say what the others need. Nothing is opened for the
    collaborators: the channels are built, asked, and closed."""
    engine = create_engine(settings.directory_url, settings.directory)
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-check")
    wiring = Wiring(settings, Health(), bus, engine, Metrics())
    try:
        return [row for channel in wiring.channels() for row in await channel.check()]
    finally:
        await wiring.close()
        await bus.close()
        await engine.dispose()
