"""Fixtures of the email tests: a Dovecot of the test's own (plain, or offering STARTTLS),
an SMTP server that records what it accepts, a proxy that takes the IMAP server away, and
one vhost per test module. The servers themselves are tests/support/mail.py's."""

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from aiosmtpd.controller import Controller

from ingest.bus import Bus
from ingest.settings import BusSettings
from ingest.topology import ROUTER_QUEUE
from tests.support.broker import fresh_vhost, vhost_url
from tests.support.mail import Dovecot, Recorder, SmtpSink, start_dovecot
from tests.support.net import TcpProxy, free_port


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    """A Dovecot of this test's own (plain IMAP, no STARTTLS offered) on a loopback port."""
    yield from start_dovecot(tls=False)


@pytest.fixture
def dovecot_tls() -> Iterator[Dovecot]:
    """A Dovecot offering STARTTLS with a self-signed certificate (``server.cert``)."""
    yield from start_dovecot(tls=True)


@pytest.fixture
async def smtp_server() -> AsyncIterator[SmtpSink]:
    """An aiosmtpd server on a loopback port that records every message it accepts."""
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield SmtpSink("127.0.0.1", port, recorder)
    finally:
        await asyncio.to_thread(controller.stop)


@pytest.fixture
async def imap_proxy(dovecot: Dovecot) -> AsyncIterator[TcpProxy]:
    """A TCP proxy in front of the test's Dovecot, listening."""
    proxy = TcpProxy("127.0.0.1", dovecot.port)
    await proxy.restore()
    yield proxy
    await proxy.cut()


@pytest.fixture(scope="module")
async def module_bus() -> AsyncIterator[Bus]:
    """One vhost and bus for a whole test module: creating a vhost costs seconds."""
    with fresh_vhost("omniroute-test-email") as name:
        bus = Bus(
            vhost_url(name),
            BusSettings(queue_type="quorum", delivery_limit=3),
            name="test-email",
        )
        await bus.open()
        yield bus
        await bus.close()


@pytest.fixture
async def email_bus(module_bus: Bus) -> Bus:
    """The module's bus with ``omniroute.router`` emptied before the test."""
    channel = await module_bus.connection.channel()
    try:
        queue = await channel.get_queue(ROUTER_QUEUE)
        await queue.purge()
    finally:
        await channel.close()
    return module_bus
