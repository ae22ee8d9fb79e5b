"""Opening the directory database and bringing its schema up to date with Alembic.

SQLite (a file in the state directory) serves one instance; PostgreSQL serves several.
"""

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import ExceptionContext, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    OperationalError,
    SQLAlchemyError,
)
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from ingest.errors import ConfigError, OmnirouteError
from routers.settings import DirectorySettings
from routers.store import transactions

if TYPE_CHECKING:  # Alembic is imported where it is used: loading the settings does not
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent.parent / "migrations"

#: a pooled PostgreSQL connection back in the pool this long (seconds) is pinged before use
PING_AFTER_IDLE = 1.0


def normalise_url(url: str) -> str:
    """Pick the async driver for plain ``sqlite://`` and ``postgresql://`` URLs."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"database_url: not a database URL: {exc}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.drivername == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend == "postgresql" and parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    elif backend not in ("sqlite", "postgresql"):
        raise ConfigError(f"database_url: {backend} is not supported (use sqlite or postgresql)")
    return parsed.render_as_string(hide_password=False)


def create_engine(
    url: str, settings: DirectorySettings | None = None, *, make_dirs: bool = True
) -> AsyncEngine:
    """The directory's engine; a SQLite file's folder is made now unless ``make_dirs`` is
    false (``omniroute check`` creates nothing)."""
    settings = settings or DirectorySettings()
    url = normalise_url(url)
    # hide_parameters: SQL errors reach logs and dead-letter reasons, and their bound
    # parameters are customer identities and message text
    kwargs: dict[str, Any] = {"hide_parameters": True}
    if url.startswith("sqlite"):
        # no pre-ping: a file cannot drop a connection, and the ping cost a round trip
        # through aiosqlite's thread on every checkout (several per routed batch)
        if make_dirs:
            _ensure_sqlite_directory(url)
        kwargs["connect_args"] = {"timeout": settings.statement_timeout}
    else:
        kwargs["pool_size"] = settings.pool_size
        kwargs["connect_args"] = {
            "timeout": settings.statement_timeout,
            "command_timeout": settings.statement_timeout,
        }
    engine = create_async_engine(url, **kwargs)
    if url.startswith("sqlite"):
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        transactions.attach(
            engine, sqlite_connect=kwargs["connect_args"], on_connect=_sqlite_pragmas
        )
    else:
        event.listen(engine.sync_engine, "do_connect", _connect_or_operational_error)
        event.listen(engine.sync_engine, "handle_error", _network_error_is_operational)
        event.listen(engine.sync_engine, "checkin", _idle_from_now)
        event.listen(engine.sync_engine, "checkout", _ping_if_idle)
    return engine


# A restarted server leaves dead connections in the pool. SQLAlchemy's pre-ping would find
# them, but through asyncpg it costs three round trips (BEGIN, ";", ROLLBACK) on every
# checkout, several per routed batch, for connections that came back milliseconds ago. So
# a connection asyncpg already saw closed (the server ended it) is replaced at once, and
# only one idle for PING_AFTER_IDLE is pinged; one that dies unnoticed while in steady use
# fails its unit as an outage (retried, within the statement timeout) and is replaced.
def _idle_from_now(_dbapi_connection: Any, record: Any) -> None:
    record.info["omniroute_idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    since = record.info.pop("omniroute_idle_since", None)
    driver = getattr(dbapi_connection, "driver_connection", None)
    if driver is not None and driver.is_closed():  # no round trip: asyncpg's own state
        raise DisconnectionError("pooled connection was closed by the server")
    if since is None or time.monotonic() - since < PING_AFTER_IDLE:
        return
    try:
        dbapi_connection.ping()  # under the connection's command_timeout
    except Exception as exc:
        # the pool discards this connection and checks out another (a new one if need be)
        raise DisconnectionError(f"pooled connection is dead: {exc!r}") from exc


def _connect_or_operational_error(
    dialect: Any, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
) -> Any:
    """asyncpg's connect raises bare ``OSError``/``TimeoutError`` (refused, unreachable, no
    answer within the timeout), which SQLAlchemy passes through unwrapped; callers translate
    ``SQLAlchemyError`` into ``TransientError``, so without this a database outage became a
    500 on the webhooks and a "bug" dead-letter in the workers instead of a retry."""
    dbapi = dialect.loaded_dbapi
    try:
        return dbapi.connect(*cargs, **cparams)
    except OSError as exc:
        raise dbapi.OperationalError(f"cannot connect: {exc!r}", exc) from exc


def _network_error_is_operational(context: ExceptionContext) -> DBAPIError | None:
    """The same for a statement: a stalled server ends in a bare ``TimeoutError``
    (``command_timeout``), a cut one in ``OSError``; both mean "try again later"."""
    error = context.original_exception
    if context.sqlalchemy_exception is None and isinstance(error, OSError):
        context.is_disconnect = True
        return OperationalError(context.statement, context.parameters, error)
    return None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI read while the daemon writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")  # the busy timeout: connect_args' "timeout"
    cursor.close()


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(url: str) -> "Config":
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", normalise_url(url).replace("%", "%%"))
    return cfg


async def migrate(url: str, revision: str = "head") -> None:
    """Apply every pending migration (up to ``revision``); Alembic drives its own loop, so
    it runs in a thread."""
    from alembic import command

    _ensure_sqlite_directory(normalise_url(url))
    try:
        await asyncio.to_thread(command.upgrade, _alembic_config(url), revision)
    except (SQLAlchemyError, OSError) as exc:
        shown = make_url(normalise_url(url)).render_as_string(hide_password=True)
        reason = getattr(exc, "orig", None) or exc
        raise DirectoryUnavailable(
            f"cannot open or migrate the directory at {shown}: {reason}"
        ) from exc


class DirectoryUnavailable(OmnirouteError):
    """The directory database cannot be reached or brought up to date."""


def missing_sqlite_file(url: str) -> Path | None:
    """The SQLite file ``url`` names when it does not exist yet (opening it would create it),
    else None: a command that only reads must say so rather than leave an empty file."""
    parsed = make_url(normalise_url(url))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database)
    return None if path.exists() else path


def _ensure_sqlite_directory(url: str) -> None:
    if url.startswith("sqlite"):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)


async def require_current(url: str) -> None:
    """Refuse to work on a directory whose schema is not this version's: commands other
    than ``migrate`` and the daemon never change the schema themselves."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config(url)).get_current_head()
    if (missing := missing_sqlite_file(url)) is not None:
        raise DirectoryUnavailable(
            f"there is no directory at {missing} yet: run `omniroute directory migrate` to "
            "create it (the daemon also does at its first start)"
        )
    try:
        current = await current_revision(url)
    except (SQLAlchemyError, OSError) as exc:
        shown = make_url(normalise_url(url)).render_as_string(hide_password=True)
        raise DirectoryUnavailable(f"cannot open the directory at {shown}: {exc}") from exc
    if current is None:
        shown = make_url(normalise_url(url)).render_as_string(hide_password=True)
        raise DirectoryUnavailable(
            f"the directory database at {shown} is empty (no omniroute tables yet): run "
            "`omniroute directory migrate` to create them (the daemon also does at its first "
            "start)"
        )
    if current != head:
        raise DirectoryUnavailable(
            f"the directory schema is at {current}, this omniroute needs {head}: "
            "run `omniroute directory migrate`"
        )


async def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(sync).get_current_revision()
            )
    finally:
        await engine.dispose()
