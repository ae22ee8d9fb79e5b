"""A small pool of mail-parsing processes (``connectors.email.parse_worker``), so a hostile mail
costs a worker, never the daemon, and both cores parse.

Invariants:
- A worker parses one mail at a time, in the order written to it; a few small mails
  (``DEPTH``, each at most ``PIPE_CHUNK``) wait in its pipe behind the one it parses, so it
  never idles while the daemon's loop is busy elsewhere (one at a time, the workers of a
  batch waited on the loop for most of each mail). A larger mail goes to an idle worker
  and has it alone until answered. ``parse`` returns the message or raises
  ``ParseFailed`` with a reason code, never anything else (cancellation aside).
- A worker that overruns ``timeout * 2 + 1`` seconds of wall clock on one mail (counted
  from when it is done with the one before), dies, answers out of frame, runs out of
  memory or CPU, or is abandoned mid-mail by a cancelled caller is killed and replaced: no
  worker is ever reused in an unknown state. The mails waiting behind it were never begun:
  they go to another worker and cost nothing.
- ``close`` ends every worker within a deadline, whatever they are doing.
"""

import asyncio
import contextlib
import json
import os
import sys
from collections import deque
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
#: an answer the pool makes for a mail a failed worker never began: sent again elsewhere
_NOT_BEGUN = b"Q"


#: bytes of a mail written to a worker's pipe at once, each awaited before the next
PIPE_CHUNK = 64 * 1024
#: mails (each at most PIPE_CHUNK) written to one worker before its first answer
DEPTH = 16
#: the largest answer read from a worker: a message is text (512 KiB), inline attachments
#: (``inline_attachment_max``) and metadata; anything larger is refused, never buffered
MAX_ANSWER = 16 * 1024 * 1024
#: times a mail is sent again because a worker ahead of it failed (each time another
#: mail cost that worker its life, so this is never reached but by a flood of them)
_MAX_RESENDS = 16


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
class _Request:
    """A mail written to a worker; its answer is set by the worker's reader."""

    answer: "asyncio.Future[_Answer]"
    alone: bool  # larger than PIPE_CHUNK: the worker takes nothing else until it answers


@dataclass(eq=False)
class _Worker:
    """One worker process, its pipes and the mails written to it; compared by identity."""

    process: asyncio.subprocess.Process
    stdin: asyncio.StreamWriter = field(init=False)
    stdout: asyncio.StreamReader = field(init=False)
    #: written, not yet answered, in the order the worker takes them
    queue: deque[_Request] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    reader: "asyncio.Task[None] | None" = None
    retired: bool = False

    def __post_init__(self) -> None:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.stdin = self.process.stdin
        self.stdout = self.process.stdout

    def room(self, alone: bool) -> bool:
        if self.retired or self.process.returncode is not None:
            return False
        if alone or (self.queue and self.queue[-1].alone):
            return not self.queue
        return len(self.queue) < DEPTH

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class ParsePool:
    """Start with ``async with ParsePool(settings) as pool``; ``await pool.parse(raw, …)``."""

    def __init__(self, settings: PoolSettings) -> None:
        self._settings = settings
        self._all: set[_Worker] = set()
        self._starting = 0
        self._alone_waiting = 0  # large mails waiting for an idle worker
        #: set whenever a worker may have room: an answer read, a worker retired or started
        self._room = asyncio.Event()
        self._closed = False
        self.replaced = 0  # workers killed and replaced, for tests and metrics

    async def __aenter__(self) -> "ParsePool":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def parse(self, raw: bytes, **kwargs: Any) -> InboundMessage:
        """The message ``normalise(raw, **kwargs)`` makes, parsed in a worker.

        A worker that dies before it answered (stopped by a signal meant for the daemon,
        the OOM killer while idle) costs a retry on a fresh one, not the mail; a mail
        behind one that killed its worker is sent again without counting."""
        meta = json.dumps(kwargs).encode()
        crashed = False
        for _ in range(_MAX_RESENDS):
            answer = await self._one(raw, meta)
            if answer.status == _NOT_BEGUN:
                continue
            if answer.status == b"X" and answer.early and not crashed:
                crashed = True
                continue
            break
        else:
            answer = _Answer(b"X", b"parser_crashed: workers kept failing ahead of it", False)
        if answer.status == b"O":
            try:
                return InboundMessage.model_validate_json(answer.payload)
            except ValidationError as exc:
                raise ParseFailed("parser_error", f"worker answer invalid: {exc}") from exc
        text = answer.payload.decode("utf-8", "replace")
        reason = text.split(":", 1)[0] if answer.status == b"L" else _STATUS[answer.status]
        raise ParseFailed(reason, text)

    async def _one(self, raw: bytes, meta: bytes) -> "_Answer":
        """One attempt: the mail written to a worker with room, then its answer."""
        alone = len(raw) > PIPE_CHUNK
        worker = await self._pick(alone)
        request = _Request(asyncio.get_running_loop().create_future(), alone)
        worker.queue.append(request)
        worker.wake.set()
        head = REQUEST.pack(len(meta), len(raw)) + meta
        if not alone:
            # most mail: one write, whole in the transport's buffer at once, so no
            # cancellation can leave half a frame (a copy of at most PIPE_CHUNK bytes costs
            # less than a second system call)
            worker.stdin.write(head + raw)
        else:
            failed = await self._write_alone(worker, head, raw)
            if failed is not None:
                return failed
        try:
            return await request.answer
        except asyncio.CancelledError:
            if worker.queue and worker.queue[0] is request:
                # the caller is gone while its mail is parsed: the worker's state is of no
                # use to anyone (the reader hands what waits behind it on)
                await asyncio.shield(self._retire(worker))
            raise

    async def _write_alone(self, worker: _Worker, head: bytes, raw: bytes) -> "_Answer | None":
        """A large mail in chunks, each awaited; None once written. Half a frame (a
        deadline, a dead worker, a cancelled caller) ends the worker."""
        try:
            async with asyncio.timeout(self._deadline):
                worker.stdin.write(head)
                for start in range(0, len(raw), PIPE_CHUNK):  # never a second copy of it
                    worker.stdin.write(raw[start : start + PIPE_CHUNK])
                    await worker.stdin.drain()
            return None
        except TimeoutError:
            await self._retire(worker)
            detail = f"parse_timeout: not taken within {self._deadline:g} s"
            return _Answer(b"T", detail.encode(), reusable=False)
        except OSError as exc:
            await self._retire(worker)
            detail = f"parser_crashed: worker ended ({worker.process.returncode}): {exc!r}"
            return _Answer(b"X", detail.encode(), reusable=False, early=True)
        except BaseException:
            await asyncio.shield(self._retire(worker))
            raise

    @property
    def _deadline(self) -> float:
        return self._settings.timeout * 2 + 1

    async def _pick(self, alone: bool) -> _Worker:
        """An idle worker, else a new one while the pool is not full, else (for a small
        mail) the live worker with the fewest mails waiting. While a large mail waits,
        small ones take only a new worker, so the queues drain and it gets one."""
        self._alone_waiting += alone
        try:
            while True:
                if self._closed:
                    raise TransientError("the mail parse pool is closed")
                for worker in [w for w in self._all if w.process.returncode is not None]:
                    if not worker.queue:  # died idle: its reader waits for nothing
                        await self._retire(worker)
                idle = [w for w in self._all if w.room(alone) and not w.queue]
                if idle and (alone or not self._alone_waiting):
                    return idle[0]
                if len(self._all) + self._starting < self._settings.workers:
                    return await self._start()
                room = [w for w in self._all if w.room(alone)]
                if room and not self._alone_waiting:
                    return min(room, key=lambda w: len(w.queue))
                self._room.clear()
                await self._room.wait()
        finally:
            self._alone_waiting -= alone

    async def _start(self) -> _Worker:
        self._starting += 1
        try:
            worker = await self._spawn()
        finally:
            self._starting -= 1
            self._room.set()  # a start that failed leaves room for another to try
        if self._closed:  # closed while it started: close did not see it
            await self._retire(worker)
            raise TransientError("the mail parse pool is closed")
        worker.reader = asyncio.create_task(self._read_answers(worker), name="parse-answers")
        return worker

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

    async def _read_answers(self, worker: _Worker) -> None:
        """Answer the worker's mails in order until it fails or the pool closes; then the
        mails behind the one it failed on are handed back, never begun."""
        try:
            while True:
                while not worker.queue:
                    worker.wake.clear()
                    await worker.wake.wait()
                request = worker.queue[0]
                answer = await self._read_answer(worker)
                worker.queue.popleft()
                if not answer.reusable:
                    self._drop(worker)  # before its caller hears: the pool says so too
                if not request.answer.done():
                    request.answer.set_result(answer)
                self._room.set()
                if not answer.reusable:
                    return
        finally:
            for request in worker.queue:
                if not request.answer.done():
                    request.answer.set_result(_Answer(_NOT_BEGUN, b"", reusable=False))
            worker.queue.clear()
            self._room.set()
            if not self._closed:  # close ends the workers its own way
                await asyncio.shield(self._retire(worker))

    async def _read_answer(self, worker: _Worker) -> "_Answer":
        """The answer to the mail the worker is on, within the deadline of one mail."""
        read_any = False
        try:
            async with asyncio.timeout(self._deadline):
                head = await worker.stdout.readexactly(ANSWER.size)
                read_any = True
                status, size = ANSWER.unpack(head)
                if size > MAX_ANSWER:
                    detail = f"parser_error: an answer of {size} bytes (over {MAX_ANSWER})"
                    return _Answer(b"E", detail.encode(), reusable=False)
                payload = await worker.stdout.readexactly(size)
        except TimeoutError:
            detail = f"parse_timeout: no answer within {self._deadline:g} s"
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
        self._drop(worker)
        worker.kill()
        if worker.reader is not None and worker.reader is not asyncio.current_task():
            worker.reader.cancel()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            async with asyncio.timeout(5):
                await worker.process.wait()

    def _drop(self, worker: _Worker) -> None:
        """Take the worker out of use (once): nothing more is written to it."""
        if not worker.retired:
            worker.retired = True
            self._all.discard(worker)
            self.replaced += 1
            self._room.set()

    async def close(self, *, drain: float = 0.0) -> None:
        """End every worker; with ``drain``, first give mails being parsed that long."""
        self._closed = True
        self._room.set()
        if drain > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    while any(w.queue for w in self._all):
                        self._room.clear()
                        await self._room.wait()
        workers = list(self._all)
        self._all.clear()
        for worker in workers:
            worker.retired = True
            if worker.reader is not None:
                worker.reader.cancel()
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
