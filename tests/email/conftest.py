"""Fixtures of the email tests: a Dovecot of the test's own (plain, or offering STARTTLS),
an SMTP server that records what it accepts, a proxy that takes the IMAP server away, and
one vhost per test module. The servers themselves, and the two Dovecot fixtures, are
tests/support/mail.py's."""

from collections.abc import AsyncIterator

import pytest

from ingest.bus import Bus
from ingest.settings import BusSettings
from ingest.topology import ROUTER_QUEUE
from tests.support.broker import fresh_vhost, opened_bus, purge, vhost_url
from tests.support.mail import Dovecot, Recorder, SmtpSink, serving_smtp
from tests.support.mail import dovecot as dovecot
from tests.support.mail import dovecot_tls as dovecot_tls
from tests.support.net import TcpProxy


@pytest.fixture
async def smtp_server() -> AsyncIterator[SmtpSink]:
    """An aiosmtpd server on a loopback port that records every message it accepts."""
    async with serving_smtp(Recorder()) as sink:
        yield sink


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
        settings = BusSettings(queue_type="quorum", delivery_limit=3)
        async with opened_bus(vhost_url(name), settings=settings, name="test-email") as bus:
            yield bus


@pytest.fixture
async def email_bus(module_bus: Bus) -> Bus:
    """The module's bus with ``omniroute.router`` emptied before the test."""
    await purge(module_bus, ROUTER_QUEUE)
    return module_bus
