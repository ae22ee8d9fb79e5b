"""Coalescing lookups: the keys asked for while a query runs are answered by one query.

Sole purpose: the router has up to ``prefetch`` messages in flight, each needing the same
few lookups by key; one ``WHERE key IN (...)`` for all of them costs about what one lookup
costs, through the database driver's thread hop and SQLAlchemy's statement machinery.
A quiet router loses nothing: the first key of a quiet period is looked up at once.
"""

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Batcher(Generic[K, V]):
    """``await get(key)`` resolves with ``load(keys)[key]``, or ``missing`` when absent.

    An exception from ``load`` is raised in every caller whose key was in that batch.
    """

    def __init__(
        self,
        load: Callable[[list[K]], Awaitable[dict[K, V]]],
        missing: V,
        *,
        max_batch: int = 256,
    ) -> None:
        self._load = load
        self._missing = missing
        self._max = max_batch
        self._pending: dict[K, list[asyncio.Future[V]]] = {}
        self._runner: asyncio.Task[None] | None = None

    async def get(self, key: K) -> V:
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append(future)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._pending:
            keys = list(self._pending)[: self._max]
            waiting = {key: self._pending.pop(key) for key in keys}
            try:
                found = await self._load(keys)
            except asyncio.CancelledError:
                for futures in [*waiting.values(), *self._pending.values()]:
                    for future in futures:
                        future.cancel()
                self._pending.clear()
                raise
            except Exception as exc:
                for futures in waiting.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(exc)
                continue
            for key, futures in waiting.items():
                value = found.get(key, self._missing)
                for future in futures:
                    if not future.done():
                        future.set_result(value)
