"""One hand-off per unit of database work on the router's hot path.

The router's batch reads and claims are a few statements each. Through aiosqlite every
cursor call of every statement (open, execute, fetch, close) and every commit is a
hand-off to its thread and back: about twenty per routed batch, each two context switches
and a GIL exchange, which cost the router more CPU than the statements. ``Transactions``
takes a plain function of a synchronous ``Connection`` and runs all of it in one
transaction:

- SQLite: on a small thread pool of its own, with a pysqlite engine on the same file and
  the same pragmas (``routers.store.engine``): one hand-off there and one back, whatever the
  function does. The busy timeout bounds a statement as for the async engine.
- PostgreSQL: through ``AsyncConnection.run_sync`` on the event loop (asyncpg is already
  asynchronous, so there is nothing to save by leaving the loop). ``read`` runs a unit
  that only reads in autocommit: under READ COMMITTED every statement takes its own
  snapshot anyway, so BEGIN and COMMIT were two round trips that changed nothing.

``transactions_of(engine)`` is the engine's ``Transactions``, made with it by
``routers.store.engine.create_engine``; disposing the engine (a reload, the end) disposes
its pool too.
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

_of_engine: "weakref.WeakKeyDictionary[AsyncEngine, Transactions]" = weakref.WeakKeyDictionary()


class Transactions:
    """Runs ``fn(connection)`` in one transaction, committed when ``fn`` returns and
    rolled back when it raises (with the database's errors as SQLAlchemy raises them).

    ``sqlite_connect`` (the async engine's ``connect_args``) and ``on_connect`` (its
    pragmas) give a SQLite file its own threads and pysqlite engine; without them, or for
    another database, the function runs on the async engine through ``run_sync``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        sqlite_connect: dict[str, Any] | None = None,
        on_connect: Callable[[Any, Any], None] | None = None,
    ) -> None:
        # a proxy of its own: the registry is keyed by the caller's proxy, which this
        # object (a value of that registry) must not keep alive
        self._async = AsyncEngine(engine.sync_engine)
        self._reading = self._async.execution_options(isolation_level="AUTOCOMMIT")
        #: a SQLite file's own engine and threads; None: run on the async engine
        self._local: tuple[Engine, ThreadPoolExecutor] | None = None
        self._used = False
        url = make_url(engine.url)
        in_file = url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")
        if in_file and sqlite_connect is not None:
            # a second engine on a file is the same database (on ":memory:" it would not be)
            sync = create_sync_engine(
                url.set(drivername="sqlite+pysqlite"),
                hide_parameters=True,
                connect_args=sqlite_connect,
                pool_size=_THREADS,
            )
            if on_connect is not None:
                event.listen(sync, "connect", on_connect)
            threads = ThreadPoolExecutor(_THREADS, thread_name_prefix="omniroute-db")
            # the threads end with this object (they would otherwise wait for a collection)
            weakref.finalize(self, threads.shutdown, wait=False)
            self._local = (sync, threads)
        event.listen(engine.sync_engine, "engine_disposed", self._disposed)

    @property
    def engine(self) -> Engine:
        """The engine the functions run on (for its events: instrumentation, tests)."""
        return self._local[0] if self._local is not None else self._async.sync_engine

    async def __call__(self, fn: Callable[[Connection], T]) -> T:
        if self._local is None:
            async with self._async.begin() as connection:
                return await connection.run_sync(fn)
        sync, threads = self._local
        self._used = True
        # A unit that has started runs to its end even if this await is cancelled (a
        # thread cannot be interrupted): its commit may land after the caller gave up.
        # Claims are idempotent (a redelivered message finds its own), so that is safe.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(threads, _in_transaction, sync, fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        """``fn``, which only reads (a write in it would not be rolled back): as a unit of
        its own, without a transaction on PostgreSQL (each statement sees what was
        committed when it started); on a SQLite file as ``__call__``."""
        if self._local is not None:
            return await self(fn)
        async with self._reading.connect() as connection:
            return await connection.run_sync(fn)

    def _disposed(self, _engine: Engine) -> None:
        """The async engine was disposed (reopened on reload, or closed): so is this pool,
        before ``dispose()`` returns. Connections in use finish their unit on the old pool;
        its idle ones are closed on one of its threads (closing may checkpoint the WAL)."""
        if self._local is None:
            return
        sync, threads = self._local
        old = sync.pool
        sync.dispose(close=False)  # new units take new connections from now on
        if self._used:
            threads.submit(old.dispose)


def _in_transaction(engine: Engine, fn: Callable[[Connection], T]) -> T:
    with engine.begin() as connection:
        return fn(connection)


def attach(engine: AsyncEngine, **kwargs: Any) -> Transactions:
    """Make ``engine``'s ``Transactions`` (with ``Transactions``' keyword arguments)."""
    transactions = _of_engine[engine] = Transactions(engine, **kwargs)
    return transactions


def transactions_of(engine: AsyncEngine) -> Transactions:
    """``engine``'s ``Transactions``; an engine not made by
    ``routers.store.engine.create_engine`` gets one that runs on the engine itself
    (``run_sync``)."""
    transactions = _of_engine.get(engine)
    return transactions if transactions is not None else attach(engine)
