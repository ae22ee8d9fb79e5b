"""One hand-off per unit of database work on the router's hot path.

The router's batch reads and claims are a few statements each. Through aiosqlite every
cursor call of every statement (open, execute, fetch, close) and every commit is a
hand-off to its thread and back: about twenty per routed batch, each two context switches
and a GIL exchange, which cost the router more CPU than the statements. A ``Runner`` takes
a plain function of a synchronous ``Connection`` and runs all of it in one transaction:

- SQLite: on a small thread pool of its own, with a pysqlite engine on the same file and
  the same pragmas (``routers.db``): one hand-off there and one back, whatever the
  function does. The busy timeout bounds a statement as for the async engine.
- PostgreSQL: through ``AsyncConnection.run_sync`` on the event loop (asyncpg is already
  asynchronous, so there is nothing to save by leaving the loop).

``runner_of(engine)`` is the engine's runner, made with it by ``routers.db.create_engine``;
disposing the engine (a reload, the end) disposes the runner's pool too.
"""

import asyncio
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")

#: threads for SQLite work: a read may run while a claim commits (WAL); SQLite takes
#: one writer at a time anyway
_THREADS = 2

_runners: "weakref.WeakKeyDictionary[AsyncEngine, Runner]" = weakref.WeakKeyDictionary()


class Runner:
    """Runs ``fn(connection)`` in one transaction, committed when ``fn`` returns and
    rolled back when it raises (with the database's errors as SQLAlchemy raises them)."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        sqlite_connect: dict[str, Any] | None = None,
        on_connect: Callable[[Any, Any], None] | None = None,
    ) -> None:
        # weak: the engine holds this runner (its dispose listener), not the other way
        self._async = weakref.ref(engine)
        self._sync: Engine | None = None
        self._threads: ThreadPoolExecutor | None = None
        url = make_url(engine.url)
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            # a file: a second engine on it is the same database (an in-memory one would
            # not be, so it stays on the async engine)
            self._sync = create_sync_engine(
                url.set(drivername="sqlite+pysqlite"),
                hide_parameters=True,
                connect_args=sqlite_connect or {},
                pool_size=_THREADS,
            )
            if on_connect is not None:
                event.listen(self._sync, "connect", on_connect)
            self._threads = ThreadPoolExecutor(_THREADS, thread_name_prefix="omniroute-db")
        event.listen(engine.sync_engine, "engine_disposed", self._disposed)

    @property
    def engine(self) -> Engine:
        """The engine the functions run on (for its events: instrumentation, tests)."""
        if self._sync is not None:
            return self._sync
        engine = self._async()
        assert engine is not None, "the engine was disposed of while in use"
        return engine.sync_engine

    async def __call__(self, fn: Callable[[Connection], T]) -> T:
        if self._sync is None or self._threads is None:
            engine = self._async()
            assert engine is not None, "the engine was disposed of while in use"
            async with engine.begin() as connection:
                return await connection.run_sync(fn)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._in_transaction, fn)

    def _in_transaction(self, fn: Callable[[Connection], T]) -> T:
        assert self._sync is not None
        with self._sync.begin() as connection:
            return fn(connection)

    def _disposed(self, _engine: Engine) -> None:
        """The async engine was disposed (reopened on reload, or closed): so is this pool.
        Connections in use finish their transaction first, as the async engine's do."""
        if self._sync is not None and self._threads is not None:
            self._threads.submit(self._sync.dispose)


def attach(engine: AsyncEngine, **kwargs: Any) -> Runner:
    """Make ``engine``'s runner (``Runner``'s keyword arguments)."""
    runner = _runners[engine] = Runner(engine, **kwargs)
    return runner


def runner_of(engine: AsyncEngine) -> Runner:
    """``engine``'s runner; an engine not made by ``routers.db.create_engine`` gets a
    runner with pysqlite's defaults."""
    runner = _runners.get(engine)
    return runner if runner is not None else attach(engine)
