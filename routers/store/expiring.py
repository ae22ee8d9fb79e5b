"""A read-through cache for lookups by key, shared by concurrent callers.

Sole purpose: the directory changes by import, not per message, so the decider may reuse
an answer for a few seconds, and when many requests want the same key at once only one of
them reads it (``read_many``). ``routers.directory.DirectoryCache`` is its one user.
"""

import asyncio
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, Generic, TypeVar

import structlog

from ingest.errors import TransientError

log = structlog.get_logger("omniroute.directory")


class _Refreshes:
    """Whether background refreshes are failing now: an outage is one warning, not one per
    refresh (bench/faults/db_proxy.py counted about 60 in 10 s)."""

    failing = False


_refreshes = _Refreshes()

K = TypeVar("K")
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """A bounded map whose entries are fresh for ``ttl`` seconds and may be served stale
    for another ``ttl`` while one reader refreshes them; the oldest go first when full."""

    def __init__(self, ttl: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        # keys a caller is reading now -> that read's answer (every key it found)
        self.loading: dict[K, asyncio.Future[dict[K, Any]]] = {}

    def get(self, key: K) -> tuple[bool, V | None]:
        entry = self._entries.get(key)
        if entry is not None and entry[0] > self._clock():
            return True, entry[1]
        return False, None

    def stale(self, key: K) -> tuple[bool, V | None]:
        """An entry past its ``ttl`` but within the grace period after it."""
        entry = self._entries.get(key)
        if entry is not None and entry[0] + self._ttl > self._clock():
            return True, entry[1]
        return False, None

    def put(self, key: K, value: V) -> None:
        if self._ttl <= 0:
            return
        self._entries.pop(key, None)
        if len(self._entries) >= self._max:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (self._clock() + self._ttl, value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


async def read_many(
    cache: "Expiring[K, V | None]",
    keys: Collection[K],
    read: Callable[[list[K]], Awaitable[dict[K, V]]],
    spawn: Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"],
) -> dict[K, V | None]:
    """The cached values of ``keys``; the missing ones are read by one ``read`` call.

    Every read runs in a task of its own (``spawn``), so a caller that gives up (a PBX
    answer's deadline) does not fail the others waiting for the same keys. A key another
    caller is reading right now is awaited, not read again: when an entry expires, the
    requests in flight wait for one query instead of each making its own. A key just past
    its time is answered from the cache while one background read refreshes it, so a busy
    entry never makes a request wait for the database.
    """
    found: dict[K, V | None] = {}
    if not keys:
        return found
    waiting: dict[K, asyncio.Future[dict[K, V]]] = {}
    mine: list[K] = []
    stale: list[K] = []
    for key in keys:
        hit, value = cache.get(key)
        if hit:
            found[key] = value
            continue
        pending = cache.loading.get(key)
        old, value = cache.stale(key)
        if old:
            found[key] = value
            if pending is None:
                stale.append(key)
        elif pending is not None:
            waiting[key] = pending
        else:
            mine.append(key)
    if stale:
        spawn(_load(cache, stale, _reading(cache, stale), read, quiet=True))
    if mine:
        reading = _reading(cache, mine)
        waiting.update(dict.fromkeys(mine, reading))
        spawn(_load(cache, mine, reading, read))
    answers: dict[asyncio.Future[dict[K, V]], dict[K, V]] = {}
    for key, future in waiting.items():
        if future not in answers:
            answers[future] = await asyncio.shield(future)
        found[key] = answers[future].get(key)
    return found


def _reading(cache: "Expiring[K, V | None]", keys: list[K]) -> "asyncio.Future[dict[K, V]]":
    """Mark ``keys`` as being read (before the read starts): later callers wait for it."""
    future: asyncio.Future[dict[K, V]] = asyncio.get_running_loop().create_future()
    future.add_done_callback(_retrieved)
    for key in keys:
        cache.loading[key] = future
    return future


async def _load(
    cache: "Expiring[K, V | None]",
    keys: list[K],
    future: "asyncio.Future[dict[K, V]]",
    read: Callable[[list[K]], Awaitable[dict[K, V]]],
    *,
    quiet: bool = False,
) -> None:
    """Read ``keys`` into the cache and resolve ``future`` with what was found; the
    callers waiting get its error. ``quiet``: a background refresh, whose failure is only
    logged."""
    try:
        loaded = await read(keys)
    except BaseException as exc:
        failure = exc if isinstance(exc, Exception) else TransientError("lookup cancelled")
        for key in keys:
            cache.loading.pop(key, None)
        future.set_exception(failure)
        if quiet and isinstance(exc, Exception):
            if not _refreshes.failing:  # once per outage, not once per refresh
                log.warning("directory.refresh_failed", error=str(exc)[:300])
            _refreshes.failing = True
            return
        if isinstance(exc, Exception):
            return  # the waiting callers have it
        raise
    if quiet and _refreshes.failing:
        _refreshes.failing = False
        log.info("directory.refresh_recovered")
    for key in keys:
        cache.put(key, loaded.get(key))
        cache.loading.pop(key, None)
    future.set_result(loaded)


def _retrieved(future: "asyncio.Future[Any]") -> None:
    """Mark a failure as seen: a load nobody else waited for must not warn at exit."""
    if not future.cancelled():
        future.exception()
