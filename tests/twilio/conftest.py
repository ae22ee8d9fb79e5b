"""Fixtures of the Twilio tests (SMS, voice and WhatsApp). The phone app itself
(``make_phones``, ``phone_bus``) is tests/phone_fixtures.py's, shared with the PBX and
HTTP tests."""

from collections.abc import AsyncIterator

import pytest

from tests.twilio.fake_api import FakeTwilioApi


@pytest.fixture
async def fake_twilio() -> AsyncIterator[FakeTwilioApi]:
    api = FakeTwilioApi()
    await api.start()
    yield api
    await api.stop()
