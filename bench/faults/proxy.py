"""A loopback TCP proxy that a scenario can cut (drop every connection, refuse new ones),
stall (keep the connections open but stop moving bytes, like a dead NAT entry or a hung
peer), and heal."""

import asyncio
import contextlib


class Link:
    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.writers = (client, upstream)
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: list[asyncio.Task[None]] = []


class FaultProxy:
    """Listens on a loopback port of its own (``port``, kept across a cut) and forwards to
    the target; as an async context manager it listens on entry and closes on exit."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._links: set[Link] = set()

    async def start(self) -> None:
        """Listen (again, on the same port after a cut)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def __aenter__(self) -> "FaultProxy":
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        return len(self._links)

    async def cut(self) -> None:
        """Stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        await self._drop(list(self._links))

    def stall(self) -> int:
        """Freeze every open connection: no byte moves either way; new ones still flow."""
        for link in self._links:
            link.flowing.clear()
        return len(self._links)

    async def drop_stalled(self) -> None:
        await self._drop([link for link in self._links if not link.flowing.is_set()])

    async def close(self) -> None:
        await self.cut()

    async def _drop(self, links: list[Link]) -> None:
        for link in links:
            for writer in link.writers:
                writer.close()
            for task in link.tasks:
                task.cancel()
            await asyncio.gather(*link.tasks, return_exceptions=True)
            self._links.discard(link)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        link = Link(writer, up_writer)
        self._links.add(link)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            link.tasks.append(asyncio.create_task(self._pipe(link, src, dst)))

    async def _pipe(self, link: Link, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                await link.flowing.wait()
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            dst.close()
            self._links.discard(link)
