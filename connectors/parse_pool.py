"""A small pool of mail-parsing processes (``connectors.parse_worker``), so a hostile mail
costs a worker, never the daemon, and both cores parse.

Invariants:
- A worker takes one mail at a time; ``parse`` returns its message or raises
  ``ParseFailed`` with a reason code, never anything else (cancellation aside).
- A worker that overruns ``timeout * 2 + 1`` seconds of wall clock, dies, answers out of
  frame, runs out of memory or CPU, or is abandoned by a cancelled caller is killed and
  replaced: no worker is ever reused in an unknown state.
- ``close`` ends every worker within a deadline, whatever they are doing.
"""

import asyncio
import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from connectors.mail_scan import Limits
from connectors.parse_worker import ANSWER, READY, REQUEST
from ingest.errors import TransientError
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.email")

#: the project root, so ``-m connectors.parse_worker`` imports whatever the daemon runs from
_ROOT = str(Path(__file__).resolve().parent.parent)
_STATUS = {
    b"L": "limit",
    b"T": "parse_timeout",
    b"M": "parse_memory",
    b"E": "parser_error",
    b"X": "parser_crashed",
}


class ParseFailed(Exception):
    """The mail could not be parsed within its limits; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PoolSettings:
    workers: int
    memory: int
    timeout: float
    limits: Limits


@dataclass(eq=False)
class _Worker:
    process: asyncio.subprocess.Process
    stdin: asyncio.StreamWriter = field(init=False)
    stdout: asyncio.StreamReader = field(init=False)

    def __post_init__(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.stdin = self.process.stdin
        self.stdout = self.process.stdout

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class ParsePool:
    """Start with ``async with ParsePool(settings) as pool``; ``await pool.parse(raw, …)``."""

    def __init__(self, settings: PoolSettings) -> None:
        self._settings = settings
        self._idle: asyncio.Queue[_Worker] = asyncio.Queue()
        self._slots = asyncio.Semaphore(settings.workers)
        self._all: set[_Worker] = set()
        self._closed = False
        self.replaced = 0  # workers killed and replaced, for tests and metrics

    async def __aenter__(self) -> "ParsePool":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def parse(self, raw: bytes, **kwargs: Any) -> InboundMessage:
        """The message ``normalise(raw, **kwargs)`` makes, parsed in a worker."""
        if self._closed:
            raise TransientError("the mail parse pool is closed")
        async with self._slots:
            worker = await self._take()
            healthy = False
            try:
                status, payload = await self._ask(worker, raw, kwargs)
                healthy = status in (b"O", b"L", b"E")
            finally:
                if healthy and not self._closed:
                    self._idle.put_nowait(worker)
                else:
                    await self._retire(worker)
        if status == b"O":
            try:
                return InboundMessage.model_validate_json(payload)
            except ValidationError as exc:
                raise ParseFailed("parser_error", f"worker answer invalid: {exc}") from exc
        text = payload.decode("utf-8", "replace")
        reason = text.split(":", 1)[0] if status == b"L" else _STATUS[status]
        raise ParseFailed(reason, text)

    async def _take(self) -> _Worker:
        with contextlib.suppress(asyncio.QueueEmpty):
            return self._idle.get_nowait()
        return await self._spawn()

    async def _spawn(self) -> _Worker:
        """A new worker, once it said it is ready: a worker that cannot start is the
        machine's problem (``TransientError``, the mail waits), never the mail's."""
        settings = self._settings
        limits = asdict(settings.limits)
        config = json.dumps(
            {"memory": settings.memory, "timeout": settings.timeout, "limits": limits}
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        process: asyncio.subprocess.Process | None = None
        try:
            async with asyncio.timeout(30):
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "connectors.parse_worker",
                    config,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                )
                worker = _Worker(process)
                ready = await worker.stdout.readexactly(ANSWER.size)
            if ready != READY:
                raise OSError(f"unexpected greeting {ready!r}")
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            raise TransientError(f"cannot start a mail parse worker: {exc!r}") from exc
        self._all.add(worker)
        return worker

    async def _ask(
        self, worker: _Worker, raw: bytes, kwargs: dict[str, Any]
    ) -> tuple[bytes, bytes]:
        meta = json.dumps(kwargs).encode()
        deadline = self._settings.timeout * 2 + 1
        try:
            async with asyncio.timeout(deadline):
                worker.stdin.write(REQUEST.pack(len(meta), len(raw)))
                worker.stdin.write(meta)
                worker.stdin.write(raw)
                await worker.stdin.drain()
                status, size = ANSWER.unpack(await worker.stdout.readexactly(ANSWER.size))
                payload = await worker.stdout.readexactly(size)
        except TimeoutError:
            return b"T", f"parse_timeout: no answer within {deadline:g} s".encode()
        except (OSError, asyncio.IncompleteReadError) as exc:
            code = worker.process.returncode
            return b"X", f"parser_crashed: worker ended ({code}): {exc!r}".encode()
        if status not in (b"O", b"L", b"T", b"M", b"E"):
            return b"X", b"parser_crashed: answer out of frame"
        return status, payload

    async def _retire(self, worker: _Worker) -> None:
        """Kill a worker that may be in any state; a new one is started on demand."""
        self._all.discard(worker)
        self.replaced += 1
        worker.kill()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(5):
                await worker.process.wait()

    async def close(self, *, drain: float = 0.0) -> None:
        """End every worker; with ``drain``, first give mails being parsed that long."""
        self._closed = True
        if drain > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    for _ in range(self._settings.workers):
                        await self._slots.acquire()
        workers = list(self._all)
        self._all.clear()
        for worker in workers:
            worker.stdin.close()  # an idle worker ends at EOF
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await asyncio.gather(*(w.process.wait() for w in workers))
        for worker in workers:
            if worker.process.returncode is None:
                worker.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await worker.process.wait()
