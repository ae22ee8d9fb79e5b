"""A small pool of mail-parsing processes (``connectors.email.parse_worker``), so a hostile mail
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

from pydantic import ValidationError

from connectors.email.parse_worker import ANSWER, READY, REQUEST
from connectors.email.scan import Limits
from ingest.errors import TransientError
from ingest.schema import InboundMessage

#: the project root, so ``-m connectors.email.parse_worker`` imports whatever the daemon runs from
_ROOT = str(Path(__file__).resolve().parents[2])
_STATUS = {
    b"L": "limit",
    b"T": "parse_timeout",
    b"M": "parse_memory",
    b"E": "parser_error",
    b"X": "parser_crashed",
}


#: bytes of a mail written to a worker's pipe at once, each awaited before the next
PIPE_CHUNK = 64 * 1024
#: the largest answer read from a worker: a message is text (512 KiB), inline attachments
#: (``inline_attachment_max``) and metadata; anything larger is refused, never buffered
MAX_ANSWER = 16 * 1024 * 1024


@dataclass(frozen=True)
class _Answer:
    status: bytes
    payload: bytes
    reusable: bool
    early: bool = False


class ParseFailed(Exception):
    """The mail could not be parsed within its limits; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class PoolSettings:
    """What ``EmailSettings`` says of the pool: its size and each worker's limits."""

    workers: int
    memory: int
    timeout: float
    limits: Limits


@dataclass(eq=False)
class _Worker:
    """One worker process and its pipes; compared by identity."""

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
        """The message ``normalise(raw, **kwargs)`` makes, parsed in a worker.

        A worker that dies before it read the mail (stopped by a signal meant for the
        daemon, the OOM killer while idle) costs a retry on a fresh one, not the mail."""
        for attempt in (1, 2):
            status, payload, early = await self._one(raw, kwargs)
            if not (status == b"X" and early and attempt == 1):
                break
        if status == b"O":
            try:
                return InboundMessage.model_validate_json(payload)
            except ValidationError as exc:
                raise ParseFailed("parser_error", f"worker answer invalid: {exc}") from exc
        text = payload.decode("utf-8", "replace")
        reason = text.split(":", 1)[0] if status == b"L" else _STATUS[status]
        raise ParseFailed(reason, text)

    async def _one(self, raw: bytes, kwargs: dict[str, Any]) -> tuple[bytes, bytes, bool]:
        """One attempt on one worker: (status, payload, whether it died before reading)."""
        if self._closed:
            raise TransientError("the mail parse pool is closed")
        async with self._slots:
            worker = await self._take()
            answer: _Answer | None = None
            try:
                answer = await self._ask(worker, raw, kwargs)
            finally:
                if answer is not None and answer.reusable and not self._closed:
                    self._idle.put_nowait(worker)
                else:
                    await asyncio.shield(self._retire(worker))
        return answer.status, answer.payload, answer.early

    async def _take(self) -> _Worker:
        """An idle worker still alive, else a new one."""
        while not self._idle.empty():
            worker = self._idle.get_nowait()
            if worker.process.returncode is None:
                return worker
            await self._retire(worker)
        return await self._spawn()

    async def _spawn(self) -> _Worker:
        """A new worker, once it said it is ready: a worker that cannot start is the
        machine's problem (``TransientError``, the mail waits), never the mail's."""
        if self._closed:
            raise TransientError("the mail parse pool is closed")
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
                    "connectors.email.parse_worker",
                    config,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    env=env,
                )
                worker = _Worker(process)
                ready = await worker.stdout.readexactly(ANSWER.size)
            if ready != READY:
                raise OSError(f"unexpected greeting {ready!r}")
        except BaseException as exc:  # cancelled too: no half-started worker outlives this
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5):
                        await asyncio.shield(process.wait())
            if isinstance(exc, OSError | TimeoutError | asyncio.IncompleteReadError):
                raise TransientError(f"cannot start a mail parse worker: {exc!r}") from exc
            raise
        self._all.add(worker)
        return worker

    async def _ask(self, worker: _Worker, raw: bytes, kwargs: dict[str, Any]) -> "_Answer":
        meta = json.dumps(kwargs).encode()
        deadline = self._settings.timeout * 2 + 1
        read_any = False
        try:
            async with asyncio.timeout(deadline):
                head = REQUEST.pack(len(meta), len(raw)) + meta
                if len(raw) <= PIPE_CHUNK:
                    # most mail: one write, one wake-up of the worker (a copy of at most
                    # PIPE_CHUNK bytes costs less than a second system call)
                    worker.stdin.write(head + raw)
                else:
                    worker.stdin.write(head)
                    for start in range(0, len(raw), PIPE_CHUNK):  # never a second copy of it
                        worker.stdin.write(raw[start : start + PIPE_CHUNK])
                        await worker.stdin.drain()
                await worker.stdin.drain()
                head = await worker.stdout.readexactly(ANSWER.size)
                read_any = True
                status, size = ANSWER.unpack(head)
                if size > MAX_ANSWER:
                    detail = f"parser_error: an answer of {size} bytes (over {MAX_ANSWER})"
                    return _Answer(b"E", detail.encode(), reusable=False)
                payload = await worker.stdout.readexactly(size)
        except TimeoutError:
            detail = f"parse_timeout: no answer within {deadline:g} s"
            return _Answer(b"T", detail.encode(), reusable=False)
        except (OSError, asyncio.IncompleteReadError) as exc:
            code = worker.process.returncode
            detail = f"parser_crashed: worker ended ({code}): {exc!r}"
            return _Answer(b"X", detail.encode(), reusable=False, early=not read_any)
        if status not in (b"O", b"L", b"T", b"M", b"E"):
            return _Answer(b"X", b"parser_crashed: answer out of frame", reusable=False)
        return _Answer(status, payload, reusable=status in (b"O", b"L", b"E"))

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
