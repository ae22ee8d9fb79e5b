"""What every fault scenario does around its fault: the command line, a temporary work
directory under a deadline, a fresh vhost with the messages offered up front queued on
``omniroute.router``, the daemon configured against a copy of the example directory, the
collector on ``omniroute.routed``, the wait for every offered message, the stop and the
counters. A scenario script keeps only its fault and the figures that belong to it."""

import argparse
import asyncio
import contextlib
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.faults.common import (
    AMQP_HOST,
    RESULTS,
    Collector,
    Daemon,
    Vhost,
    counters,
    inbound_messages,
    open_bus,
    publish_all,
    report,
    sqlite_directory,
    wait_until,
)
from ingest.bus import Bus
from ingest.schema import InboundMessage

Result = dict[str, Any]


def options(doc: str | None, **defaults: float) -> argparse.Namespace:
    """The scenario's command line: its docstring's first line as the description, one
    ``--name`` option per keyword, typed like its default."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    for name, default in defaults.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    return parser.parse_args()


def run(scenario: Callable[[Path], Awaitable[Result]], timeout: float) -> int:
    """Run ``scenario(workdir)`` in a temporary work directory, bounded by ``timeout``
    seconds; print and save its counters; the exit status (1 if a message was lost)."""
    with tempfile.TemporaryDirectory(prefix="omniroute-fault-") as tmp:
        result = asyncio.run(asyncio.wait_for(scenario(Path(tmp)), timeout))
    return report(result)


@dataclass
class Stage:
    """A scenario's world once set up (see ``set_up``): the daemon is configured but not
    started, the offered messages are queued, the collector is consuming."""

    name: str
    vhost: Vhost
    bus: Bus
    collector: Collector
    daemon: Daemon
    #: keys of the messages omniroute accepted; a scenario adds the ones it offers later
    offered: set[str]

    @property
    def routed(self) -> int:
        """Distinct messages seen on ``omniroute.routed`` so far."""
        return len(self.collector.counts)

    async def wait_routed(self, count: int, what: str) -> None:
        await wait_until(lambda: self.routed >= count, 60, what)

    async def first_routed_after(self, t: float, what: str) -> float:
        """When the first message routed at or after ``t`` arrived (waited for, bounded)."""
        await wait_until(lambda: self.collector.routed_after(t), 60, what)
        first = self.collector.routed_after(t)
        assert first is not None
        return first

    async def wait_all_routed(self) -> None:
        await wait_until(lambda: self.offered <= self.collector.counts.keys(), 90, "every message")

    async def settle_and_stop(self) -> None:
        """Give late duplicates a second to arrive, then stop the daemon with SIGTERM."""
        await asyncio.sleep(1.0)
        self.daemon.kill(signal.SIGTERM)

    def counters(self, fault_start: float, fault_end: float, **extra: Any) -> Result:
        """The counters (see ``common``) with the scenario's own figures, and the number of
        tracebacks in the daemon's log last; a log with a traceback is kept as
        ``results/<scenario>.daemon.log`` (the work directory is deleted)."""
        tracebacks = self.daemon.tracebacks()
        if tracebacks:
            RESULTS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.daemon.log, RESULTS / f"{self.name}.daemon.log")
        return counters(
            self.name,
            self.offered,
            self.collector,
            fault_start=fault_start,
            fault_end=fault_end,
            extra={**extra, "tracebacks": tracebacks},
        )


@contextlib.asynccontextmanager
async def set_up(
    name: str,
    workdir: Path,
    *,
    messages: int,
    database_url: str | None = None,
    daemon_amqp_host: str = AMQP_HOST,
    toml: str = "",
    key: Callable[[InboundMessage], str] = lambda m: m.id,
    ignore: Callable[[InboundMessage], bool] = lambda _: False,
) -> AsyncIterator[Stage]:
    """A vhost of the scenario's own with ``messages`` inbound messages published to it
    (offered, by ``key``), the collector consuming, and the daemon configured with the
    scenario's ``toml`` against ``database_url`` (default: a fresh SQLite copy of the
    example directory in ``workdir``) and the broker at ``daemon_amqp_host`` (a proxy's,
    say). On exit a daemon still running is killed and everything is closed and deleted."""
    with Vhost(name) as vhost:
        if database_url is None:
            database_url = await sqlite_directory(workdir)
        bus = open_bus(vhost.url())
        await bus.open()
        collector = Collector(vhost.url(), key=key, ignore=ignore)
        daemon = Daemon(workdir, vhost.url(daemon_amqp_host), database_url, toml=toml)
        try:
            inbound = inbound_messages(messages, name)
            await publish_all(bus, inbound)
            await collector.start()
            yield Stage(name, vhost, bus, collector, daemon, {key(m) for m in inbound})
        finally:
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.kill(signal.SIGKILL)
            await collector.close()
            await bus.close()
