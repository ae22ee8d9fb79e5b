"""Logs never carry secrets, and carry customer identities only when the operator turned
redaction off: also inside third-party error text."""

import json
import logging

import pytest
import structlog

from config.logging import configure


def _logged(capsys: pytest.CaptureFixture[str], redact: bool, **fields: str) -> dict[str, str]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure(fmt="json", level="info", redact_identities=redact)
    try:
        structlog.get_logger("t").info("test.event", **fields)
        line = capsys.readouterr().out.strip().splitlines()[-1]
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)
    return json.loads(line)  # type: ignore[no-any-return]


def test_identities_and_secrets_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    event = _logged(
        capsys,
        True,
        sender="ayse@acme.test",
        error="The 'To' number +90 532 111 22 33 is not valid; 550 <bob@x.org> unknown",
        auth_token="tw-secret",
    )
    assert event["sender"] == "a***@acme.test"
    assert "532 111" not in event["error"]
    assert "bob@x.org" not in event["error"]
    assert event["auth_token"] == "***"


def test_redaction_can_be_turned_off_but_secrets_stay_masked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    event = _logged(capsys, False, sender="ayse@acme.test", password="hunter2")
    assert event["sender"] == "ayse@acme.test"
    assert event["password"] == "***"
