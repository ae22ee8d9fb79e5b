"""``omniroute check``: is the configuration valid and is everything it names reachable?
Prints a table; exits 1 when anything failed. It changes nothing: a SQLite directory that
does not exist yet is reported, never created (issue 17)."""

import asyncio

from config.components import Wiring
from config.rules_cli import named_teams, unknown_teams
from config.settings import Settings
from ingest.bus import Bus
from ingest.errors import OmnirouteError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.protocols import CheckRow
from ingest.topology import QUEUES
from routers.store.engine import create_engine, current_revision, missing_sqlite_file

Row = CheckRow
CREATED_BY = "`omniroute directory migrate` or the first start creates it"


async def run_checks(settings: Settings) -> int:
    rows: list[Row] = [("config", True, "valid")]
    rows.append(await _check_broker(settings))
    missing = missing_sqlite_file(settings.directory_url)
    if missing is None:
        rows.append(await _check_database(settings))
    else:
        rows.append(("directory", True, f"no directory yet at {missing}: {CREATED_BY}"))
    if settings.routing.rules or settings.routing.shadow_rules or named_teams(settings):
        rows.append(await _check_rules(settings) if missing is None else _no_teams(settings))
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


def _teams_row(settings: Settings) -> tuple[str, str]:
    """The row's name and what it checks: "rules" when there are topic rules, else "teams"
    (only ``default_team``, ``address_teams``, mailboxes' ``team``)."""
    routing = settings.routing
    said = f"{len(routing.rules)} rules" if routing.rules or routing.shadow else ""
    if routing.shadow is not None:
        said += f", {len(routing.shadow.rules)} candidate rules ({routing.shadow_rules})"
    if named := named_teams(settings):
        said += (", " if said else "") + f"{len(named)} team keys"
    return ("rules" if routing.rules or routing.shadow else "teams"), said


def _no_teams(settings: Settings) -> Row:
    name, said = _teams_row(settings)
    return (name, False, f"{said}; no directory yet, so none of their teams is in it")


async def _check_rules(settings: Settings) -> Row:
    """Issues 20 and 17: the teams the topic rules and the other keys name are in the
    directory (the start and a reload refuse the configuration otherwise)."""
    routing = settings.routing
    name, said = _teams_row(settings)
    engine = create_engine(settings.directory_url, settings.directory)
    try:
        problem = await unknown_teams(engine, routing, named=named_teams(settings))
    except Exception as exc:  # any driver error is a failed check, reported in one line
        return (name, False, f"{said}; teams not checked: {type(exc).__name__}: {exc}")
    finally:
        await engine.dispose()
    return (name, problem is None, problem or f"{said}; every team is in the directory")


async def _check_connectors(settings: Settings) -> list[Row]:
    """Each enabled channel's own check, in the registry's order: log into what it can
    reach (mailboxes, SMTP), say what the others need. Nothing is opened for the
    collaborators: the channels are built, asked, and closed."""
    engine = create_engine(settings.directory_url, settings.directory, make_dirs=False)
    bus = Bus(settings.amqp_url.get_secret_value(), settings.bus, name="omniroute-check")
    wiring = Wiring(settings, Health(), bus, engine, Metrics())
    try:
        return [row for channel in wiring.channels() for row in await channel.check()]
    finally:
        await wiring.close()
        await bus.close()
        await engine.dispose()
