"""One mail-parsing process of ``ParsePool``: ``python -m connectors.email.parse_worker LIMITS``.

Sole purpose (issue 13): the stdlib parser runs where a hostile mail can cost no more
than ``email.parse_memory`` of address space (``RLIMIT_AS``) and ``email.parse_timeout``
of CPU (``RLIMIT_CPU``, raised again after each mail), never in the daemon. The pool also
kills a worker that overruns its wall-clock deadline, so a parse stuck inside C code ends
too.

Frames on stdin/stdout, big-endian: a request is ``>II`` (lengths of the JSON keyword
arguments of ``normalise`` and of the raw mail) then both; an answer is ``>cI`` (status,
length) then the payload: ``O`` the message's JSON, ``L`` the limit a pre-check found,
``T`` CPU time exceeded, ``M`` out of memory, ``E`` the parser's error. A first ``R``
frame says the worker is ready. Anything the parser prints goes to stderr, never into
the frames.
"""

import contextlib
import json
import math
import os
import resource
import signal
import struct
import sys
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from connectors.email.mime import normalise
from connectors.email.scan import Limits, precheck

REQUEST = struct.Struct(">II")
ANSWER = struct.Struct(">cI")
#: written once the worker's limits are in place: the pool knows it can start
READY = ANSWER.pack(b"R", 0)


class _CpuExceeded(BaseException):
    """Raised from the SIGXCPU handler: the mail's CPU budget is spent. A BaseException,
    so the parser's own ``except Exception`` fallbacks cannot swallow it."""


_parsing = False


def _on_sigxcpu(signum: int, frame: FrameType | None) -> None:
    """Ends the parse; outside one (a late signal after the answer) it is ignored, so it
    can never break a frame."""
    if _parsing:
        raise _CpuExceeded


def _read(stream: BinaryIO, size: int) -> bytes | None:
    """``size`` bytes, or None at the end of the stream (the pool closed it)."""
    data = stream.read(size)
    return data if len(data) == size else None


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_one(job: dict[str, object], raw: bytes, limits: Limits) -> tuple[bytes, bytes]:
    """One mail: the pre-checks, then ``normalise``; never raises but for CPU time."""
    reason = precheck(raw, limits)
    if reason is not None:
        return b"L", reason.encode()
    try:
        message = normalise(raw, **job)  # type: ignore[arg-type]
    except MemoryError:
        return b"M", b"parse_memory: the parser ran out of its address space"
    except RecursionError:
        return b"E", b"parser_error: RecursionError"
    except _CpuExceeded:
        raise
    except Exception as exc:  # a parser bug: the pool makes a stand-in of the mail
        return b"E", f"parser_error: {type(exc).__name__}: {exc}"[:400].encode()
    return b"O", message.model_dump_json().encode()


def serve(stdin: BinaryIO, stdout: BinaryIO, limits: Limits, memory: int, timeout: float) -> None:
    """Answer mails until stdin ends. Each mail gets ``timeout`` CPU seconds and an
    address space of ``memory`` plus ten times its size (the stdlib holds several copies
    of a mail while it parses: a 25 MB mail with attachments needs about 250 MB)."""
    global _parsing
    _, cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)
    _, as_hard = resource.getrlimit(resource.RLIMIT_AS)
    while (header := _read(stdin, REQUEST.size)) is not None:
        meta_len, raw_len = REQUEST.unpack(header)
        meta = _read(stdin, meta_len)
        raw = _read(stdin, raw_len)
        if meta is None or raw is None:
            return
        space = memory + 10 * raw_len
        if as_hard != resource.RLIM_INFINITY:
            space = min(space, as_hard)
        resource.setrlimit(resource.RLIMIT_AS, (space, as_hard))
        resource.setrlimit(resource.RLIMIT_CPU, (math.ceil(_cpu_used() + timeout), cpu_hard))
        _parsing = True
        try:
            status, payload = parse_one(json.loads(meta), raw, limits)
        except _CpuExceeded:
            status, payload = b"T", f"parse_timeout: over {timeout:g} s of CPU".encode()
        finally:
            _parsing = False
            resource.setrlimit(resource.RLIMIT_CPU, (cpu_hard, cpu_hard))
        del raw
        stdout.write(ANSWER.pack(status, len(payload)) + payload)
        stdout.flush()


def main() -> None:
    """Set the limits, say READY, serve; the configuration is one JSON argument."""
    config = json.loads(sys.argv[1])
    limits = Limits(**config["limits"])
    # frames own the real stdout; a stray print from a library goes to stderr
    frames = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    memory = int(config["memory"])
    resource.setrlimit(resource.RLIMIT_AS, (memory, resource.getrlimit(resource.RLIMIT_AS)[1]))
    with contextlib.suppress(OSError):  # under memory pressure the kernel takes a worker first
        Path("/proc/self/oom_score_adj").write_text("1000")
    signal.signal(signal.SIGXCPU, _on_sigxcpu)
    # the pool ends a worker by closing its stdin; a stop signal meant for the daemon
    # (systemd's to the whole unit, ^C to the process group) must not kill a parse
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        frames.write(READY)
        frames.flush()
        serve(sys.stdin.buffer, frames, limits, memory, float(config["timeout"]))
    except (BrokenPipeError, KeyboardInterrupt):
        pass


if __name__ == "__main__":
    main()
