"""Hostile connections to the HTTP port (issue 13, item 3): slow heads and bodies are cut
off, a flood of connections cannot lock out the probes and the PBX, and running out of
descriptors is logged once, not per accept() attempt. Real sockets on loopback throughout."""

import asyncio
import contextlib
import logging
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from fastapi import APIRouter, Request
from structlog.testing import LogCapture

from connectors.http import HttpServer, build_app
from connectors.settings import HttpSettings
from ingest.health import Health
from ingest.metrics import Metrics
from tests.daemon_fixtures import ROOT, DaemonProcess
from tests.support.net import free_port
from tests.support.waiting import until

LOCAL = "127.0.0.1"
Events = list[MutableMapping[str, Any]]


@contextlib.contextmanager
def captured() -> Iterator[Events]:
    """Every structlog event, whatever level an earlier test configured."""
    saved = structlog.get_config()
    capture = LogCapture()
    structlog.configure(
        processors=[capture],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


def named(events: Events, name: str) -> Events:
    return [e for e in events if e["event"] == name]


def body_readers() -> APIRouter:
    """Handlers that read the request body: one on a reserved path, one not."""
    router = APIRouter()

    @router.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @router.post("/v1/route")
    async def route(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    return router


@contextlib.asynccontextmanager
async def serving(settings: HttpSettings, routers: Sequence[APIRouter] = ()) -> AsyncIterator[int]:
    """The real HttpServer on a loopback port; yields the port."""
    app = build_app(health=Health(), metrics=Metrics(), http=settings, routers=routers)
    server = HttpServer(app, settings, shutdown_timeout=2)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop))
    try:
        async with asyncio.timeout(10):
            await server.started.wait()
        yield server.port
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def connect(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    async with asyncio.timeout(5):
        await asyncio.get_running_loop().sock_connect(sock, (LOCAL, port))
    return sock


async def until_closed(sock: socket.socket, timeout: float) -> bytes:
    """What the server sends until it closes the connection (raw recv: a reset loses nothing
    already received)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def until_seen(sock: socket.socket, marker: bytes, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data:
            chunk = await loop.sock_recv(sock, 65536)
            assert chunk, f"closed before {marker!r}: {data!r}"
            data += chunk
    return data


async def send(sock: socket.socket, data: bytes) -> None:
    async with asyncio.timeout(5):
        await asyncio.get_running_loop().sock_sendall(sock, data)


async def ask(port: int, path: str, *, method: str = "GET", headers: str = "") -> bytes:
    """One request on a fresh connection that closes after the answer."""
    sock = await connect(port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n"
        await send(sock, head.encode())
        return await until_closed(sock, 5)
    finally:
        sock.close()


async def dribble(sock: socket.socket, data: bytes, pause: float) -> None:
    """Send one byte at a time, as a slowloris client does, until the server hangs up."""
    for i in range(len(data)):
        try:
            await send(sock, data[i : i + 1])
        except OSError:
            return
        await asyncio.sleep(pause)


SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: t\r\nUser-Agent: " + b"s" * 200 + b"\r\n\r\n"


async def test_a_head_dribbled_byte_by_byte_is_cut_off_at_the_header_timeout() -> None:
    """Slowloris: a byte every 0.1 s would take 23 s; the deadline is for the whole head."""
    loop = asyncio.get_running_loop()
    async with serving(HttpSettings(host=LOCAL, port=0, header_timeout=1.0)) as port:
        sock = await connect(port)
        started = loop.time()
        slow = asyncio.create_task(dribble(sock, SLOW_HEAD, 0.1))
        try:
            answer = await until_closed(sock, 5)
        finally:
            slow.cancel()
            sock.close()
        elapsed = loop.time() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 0.9 <= elapsed < 2.0, elapsed


async def test_idle_and_kept_alive_connections_get_the_same_head_deadline() -> None:
    """A silent connection is closed without a word; on a kept-alive connection the next head
    is due within the deadline too (uvicorn's keep-alive timer stops at the first byte)."""
    loop = asyncio.get_running_loop()
    async with serving(HttpSettings(host=LOCAL, port=0, header_timeout=1.0)) as port:
        silent = await connect(port)
        kept = await connect(port)
        try:
            await send(kept, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert b" 200 " in await until_seen(kept, b'"ok"}', 5)
            started = loop.time()
            slow = asyncio.create_task(dribble(kept, SLOW_HEAD, 0.1))
            try:
                again = await until_closed(kept, 5)
            finally:
                slow.cancel()
            assert again.startswith(b"HTTP/1.1 408 "), again
            assert loop.time() - started < 2.0
            assert await until_closed(silent, 2) == b""
        finally:
            silent.close()
            kept.close()


async def test_a_stalled_body_is_answered_408_and_an_unread_one_cut_off() -> None:
    """A handler waiting for a body gets a clean 408; a body the app never read (the answer
    already sent) cannot keep the connection either."""
    loop = asyncio.get_running_loop()
    settings = HttpSettings(host=LOCAL, port=0, body_timeout=1.0)
    async with serving(settings, [body_readers()]) as port:
        sock = await connect(port)
        try:
            started = loop.time()
            await send(sock, b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
            await send(sock, b"x" * 10)
            answer = await until_closed(sock, 5)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert b"connection: close" in answer.lower()
            assert 0.9 <= loop.time() - started < 2.0
        finally:
            sock.close()
        sock = await connect(port)
        try:
            await send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n")
            started = loop.time()
            slow = asyncio.create_task(dribble(sock, b"y" * 100, 0.1))
            try:
                answer = await until_closed(sock, 5)
            finally:
                slow.cancel()
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            assert loop.time() - started < 2.0
        finally:
            sock.close()


async def test_an_idle_flood_cannot_lock_out_a_health_check() -> None:
    """Forty silent connections against a cap of four: each newcomer closes the one that has
    waited longest for a head, so a real request always gets in."""
    settings = HttpSettings(host=LOCAL, port=0, max_connections=4, header_timeout=60)
    async with serving(settings) as port:
        flood = [await connect(port) for _ in range(40)]
        try:
            started = time.monotonic()
            assert b'"ok"' in await ask(port, "/healthz")
            assert time.monotonic() - started < 1.0
            closed = 0
            for sock in flood[:30]:
                closed += await until_closed(sock, 2) == b""
            assert closed == 30
        finally:
            for sock in flood:
                sock.close()


async def test_busy_connections_leave_a_reserve_for_probes_and_the_pbx() -> None:
    """All four connections busy with requests: two more are served for /healthz, /readyz and
    /v1/route only; past those, connections are closed at once; then service resumes."""
    settings = HttpSettings(
        host=LOCAL,
        port=0,
        max_connections=4,
        reserved_connections=2,
        header_timeout=30,
        body_timeout=30,
    )
    expect = "Content-Length: 5\r\nExpect: 100-continue\r\n"

    async def busy(path: str) -> socket.socket:
        sock = await connect(port)
        await send(sock, f"POST {path} HTTP/1.1\r\nHost: t\r\n{expect}\r\n".encode())
        await until_seen(sock, b"100 Continue", 5)  # the handler is waiting for the body
        return sock

    with captured() as events:
        async with serving(settings, [body_readers()]) as port:
            held = [await busy("/upload") for _ in range(4)]
            try:
                refused = await ask(port, "/metrics")
                assert refused.startswith(b"HTTP/1.1 503 "), refused
                assert b"retry-after: 1" in refused.lower()
                started = time.monotonic()
                assert b'"ok"' in await ask(port, "/healthz")
                assert time.monotonic() - started < 1.0
                held += [await busy("/v1/route") for _ in range(2)]
                started = time.monotonic()
                assert await ask(port, "/healthz") == b""  # closed at once
                assert time.monotonic() - started < 0.5
                assert len(named(events, "http.connections_full")) == 1
                for sock in held:
                    await send(sock, b"hello")
                    assert b'{"bytes":5}' in await until_seen(sock, b"}", 5)
                assert b"# HELP" in await ask(port, "/metrics")
            finally:
                for sock in held:
                    sock.close()
            await until(lambda: named(events, "http.connections_normal"), 5)
    normal = named(events, "http.connections_normal")
    assert len(normal) == 1
    assert normal[0]["refused"] >= 1
    assert normal[0]["reserved"] >= 3


HELPER = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.stdin.readline())
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
print("open", flush=True)
sys.stdin.read()
"""


def _room_for(count: int) -> int:
    """The descriptor limit that leaves exactly ``count`` descriptors free (the kernel hands
    out the lowest free number, and the limit bounds the number)."""
    used = {int(fd) for fd in os.listdir("/proc/self/fd")}
    number = -1
    while count:
        number += 1
        count -= number not in used
    return number + 1


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def test_out_of_descriptors_is_logged_once_and_accept_backs_off() -> None:
    """EMFILE: asyncio's own accept loop logged every attempt (280,000 lines in 25 s) and
    spun; ours logs one warning, backs off, and one line once accepting works again."""
    loop = asyncio.get_running_loop()
    reported: list[str] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(str(context.get("message"))))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    settings = HttpSettings(host=LOCAL, port=0, header_timeout=60)
    try:
        with captured() as events:
            async with serving(settings) as port:
                helper = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", HELPER, str(port),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                )  # fmt: skip
                assert helper.stdin is not None
                assert helper.stdout is not None
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (_room_for(8), hard))
                    cpu = _cpu()
                    try:
                        helper.stdin.write(b"60\n")
                        async with asyncio.timeout(10):
                            assert await helper.stdout.readline() == b"open\n"
                        await asyncio.sleep(2.0)
                        cpu = _cpu() - cpu
                        failing = named(events, "http.accept_failing")
                        assert [e["error"] for e in failing] == ["EMFILE"]
                        assert not named(events, "http.accept_recovered")
                    finally:
                        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                    await until(lambda: named(events, "http.accept_recovered"), 5)
                    assert b'"ok"' in await ask(port, "/healthz")
                finally:
                    helper.stdin.close()
                    async with asyncio.timeout(10):
                        await helper.wait()
    finally:
        loop.set_exception_handler(previous)
    assert len(named(events, "http.accept_failing")) == 1
    assert len(named(events, "http.accept_recovered")) == 1
    assert [m for m in reported if "accept" in m] == []
    assert cpu < 0.3, f"{cpu:.2f} s of CPU in 2 s while accept() failed"


def _nofile_256() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def _run_with_256_descriptors(daemon: DaemonProcess, log: Path) -> "subprocess.Popen[bytes]":
    """``omniroute run`` as under ``LimitNOFILE=256``."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "config.cli", "--config", str(daemon.config), "run"],
            cwd=ROOT, env=daemon.env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=_nofile_256,  # noqa: PLW1509 -- only setrlimit, before exec
        )  # fmt: skip
    daemon.procs.append(proc)
    return proc


@pytest.mark.slow
async def test_daemon_with_256_descriptors_keeps_answering_under_1200_idle_connections(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    """The real daemon at LimitNOFILE=256 and default limits: the limits are lowered to fit,
    /healthz, /readyz and /v1/route answer within 1 s through waves of idle connections,
    accept() never fails, and everything works once the flood is gone."""
    port = free_port()
    text = daemon.config.read_text().replace("port = 0", f"port = {port}\nheader_timeout = 2")
    daemon.config.write_text(text)
    daemon.env["OMNIROUTE_API__TOKEN"] = "limits-token"
    log = tmp_path / "daemon.log"
    proc = _run_with_256_descriptors(daemon, log)

    def ready() -> bool:
        assert proc.poll() is None, log.read_text()
        return b'"daemon.ready"' in log.read_bytes()

    await until(ready, 60, "daemon.ready logged")

    probes = [
        ("/healthz", ""),
        ("/readyz", ""),
        ("/v1/route?caller=%2B905321112233", "Authorization: Bearer limits-token\r\n"),
    ]
    worst = 0.0

    async def probe_all() -> None:
        nonlocal worst
        for path, headers in probes:
            started = time.monotonic()
            answer = await ask(port, path, headers=headers)
            worst = max(worst, time.monotonic() - started)
            assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 503 ")), (path, answer)
            assert not path.startswith("/v1/") or answer.startswith(b"HTTP/1.1 200 ")

    flood: list[socket.socket] = []

    async def flooding() -> None:
        for i in range(1200):  # about 600 a second, while the probes run
            flood.append(await connect(port))
            if i % 12 == 0:
                await asyncio.sleep(0.01)

    rounds = 0
    try:
        opener = asyncio.create_task(flooding())
        while not opener.done():
            await probe_all()
            rounds += 1
        await opener
        assert rounds >= 10
        await probe_all()
        # Survivors of the flood are closed at the header deadline (2 s).
        closed = 0
        for sock in flood[-100:]:
            closed += await until_closed(sock, 5) == b""
        assert closed == 100
    finally:
        for sock in flood:
            sock.close()
    await probe_all()
    assert worst < 1.0, f"worst probe {worst:.3f} s"
    lines = log.read_text().splitlines()
    accept_errors = [
        line
        for line in lines
        if "accept_failing" in line or "socket.accept()" in line or "Too many open" in line
    ]
    assert accept_errors == []
    lowered = [line for line in lines if '"http.connections_lowered"' in line]
    assert len(lowered) == 1, lowered
    assert '"max_connections": 176' in lowered[0]
    assert len([line for line in lines if '"http.connections_full"' in line]) == 1
    per_probe = ('"pbx.route"', '"router.routed"')  # two lines per /v1/route answered
    rest = [line for line in lines if not any(name in line for name in per_probe)]
    assert len(rest) < 40, "\n".join(rest[-20:])
    assert proc.poll() is None
