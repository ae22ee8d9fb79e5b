"""A file's batches parsed ahead in worker processes, handed over in file order.

Sole purpose: keep both cores busy on the parse (phone numbers dominate it) while the
import's connection writes, and bound memory to ``depth`` batches in flight whatever the
file's size.
"""

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from routers.csv.source import CsvSource

T = TypeVar("T")


async def parsed(
    source: CsvSource,
    parse: Callable[[list[tuple[int, Any]]], T],
    pool: ProcessPoolExecutor | None,
    batch_size: int,
    depth: int,
) -> AsyncGenerator[tuple[T, int], None]:
    """``parse(records)`` of each batch, with its record count, in file order; ``parse``
    must pickle (a module-level function or a partial of one) to reach ``pool``."""
    loop = asyncio.get_running_loop()
    pending: deque[tuple[asyncio.Future[T], int]] = deque()
    eof = False
    try:
        while True:
            while not eof and len(pending) < depth:
                records = await asyncio.to_thread(source.records, batch_size)
                eof = not records
                if records:
                    pending.append((loop.run_in_executor(pool, parse, records), len(records)))
            if not pending:
                return
            future, count = pending.popleft()
            yield await future, count
    finally:
        for future, _ in pending:
            future.cancel()


@dataclass(frozen=True)
class Parsing:
    """A file and how its batches are parsed: by which pool, how many rows at once, how many
    ahead; what both import paths (row batches, customers staged) hand down."""

    source: CsvSource
    region: str
    pool: ProcessPoolExecutor | None
    batch_size: int
    depth: int

    def batches(
        self, parse: Callable[[list[tuple[int, Any]]], T]
    ) -> AsyncGenerator[tuple[T, int], None]:
        """``parsed`` of this file with ``parse``."""
        return parsed(self.source, parse, self.pool, self.batch_size, self.depth)
