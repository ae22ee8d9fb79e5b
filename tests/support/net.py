"""Loopback ports (a free one, whether one listens, waiting until it does) and a TCP proxy
that breaks the network on purpose (aio-pika's own tests do the same): ``cut()`` drops every
connection at once and refuses new ones; ``stall()`` goes silent on the open ones, as a
firewall that forgot an idle flow; ``start()`` (or ``restore()``) listens again on the
same port."""

import asyncio
import socket

from tests.support.waiting import until


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def listening(port: int) -> bool:
    """Whether something accepts connections on the loopback ``port`` now."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def wait_listening(port: int, timeout: float = 30.0) -> None:
    """Wait (bounded) until something accepts connections on the loopback ``port``: a
    daemon started in another process has opened its HTTP port."""
    await until(lambda: listening(port), timeout, f"a listener on port {port}")


class TcpProxy:
    """A loopback TCP proxy in front of ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0  # chosen at the first start, kept across cuts
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._stalled: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    restore = start

    async def cut(self) -> None:
        """Stop listening and drop every open connection, as a pulled cable would."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def stall(self) -> None:
        """Stop forwarding on every open connection without closing it: its ends wait in
        silence (until ``cut()``); new connections are forwarded as before."""
        pipes = list(self._pipes)
        self._stalled.update(pipes)
        for pipe in pipes:
            pipe.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update({writer, up_writer})
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if asyncio.current_task() not in self._stalled:
                self._writers.discard(dst)
                dst.transport.abort()
