"""Fixtures of the X (Twitter) tests: the fake X API of tests/twitter/fake_api.py on a
loopback port."""

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer

from tests.twitter.fake_api import FakeX


@pytest.fixture(name="fake_x")
async def fake_x_fixture() -> AsyncIterator[FakeX]:
    """The fake X API on 127.0.0.1, on a port of its own."""
    fake = FakeX()
    server = TestServer(fake.app(), host="127.0.0.1")  # port 0: the OS picks one
    await server.start_server()
    fake.base_url = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()
