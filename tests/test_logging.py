"""Logs never carry secrets, and carry customer identities only when the operator turned
redaction off: also inside third-party error text."""

import json
import logging
from collections.abc import Callable

import pydantic
import pytest
import structlog

from config.logging import configure


def _output(
    capsys: pytest.CaptureFixture[str], fmt: str, redact: bool, emit: Callable[[], None]
) -> str:
    """What ``emit`` writes under the daemon's logging configuration."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure(fmt=fmt, level="info", redact_identities=redact)
    try:
        emit()
        return capsys.readouterr().out
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


def _logged(capsys: pytest.CaptureFixture[str], redact: bool, **fields: str) -> dict[str, str]:
    out = _output(capsys, "json", redact, lambda: structlog.get_logger("t").info("e", **fields))
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


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


class _Order(pydantic.BaseModel):
    quantity: int


def _validation_error() -> pydantic.ValidationError:
    """What ``email.parse_failed`` logged: a customer's address inside ``input_value``."""
    try:
        _Order(quantity="ayse@acme.test +905321112233")
    except pydantic.ValidationError as exc:
        return exc
    raise AssertionError("the model accepted a non-number")


def _structlog_exception() -> None:
    try:
        raise _validation_error()
    except pydantic.ValidationError:
        structlog.get_logger("t").exception("email.parse_failed", uid=7)


def _stdlib_exception() -> None:
    error = _validation_error()
    logging.getLogger("asyncio").error(
        "Task exception was never retrieved: %s (amqp://omniroute:hunter2@mq.test/)",
        error,
        exc_info=(type(error), error, error.__traceback__),
    )


@pytest.mark.parametrize("fmt", ["json", "console"])
@pytest.mark.parametrize("emit", [_structlog_exception, _stdlib_exception])
def test_exception_text_and_tracebacks_are_redacted(
    capsys: pytest.CaptureFixture[str], fmt: str, emit: Callable[[], None]
) -> None:
    """A traceback is free text like any field: a parse failure must not log the sender."""
    out = _output(capsys, fmt, True, emit)
    assert "ValidationError" in out
    assert "Traceback (most recent call last)" in out
    assert "ayse@acme.test" not in out
    assert "905321112233" not in out
    assert "a***@acme.test" in out
    assert "hunter2" not in out
    if fmt == "json":
        for line in out.splitlines():
            json.loads(line)


def test_unredacted_exceptions_still_hide_url_passwords(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``log.redact = false`` shows customers to the operator, never the broker password."""
    out = _output(capsys, "json", False, _stdlib_exception)
    assert "ayse@acme.test" in out
    assert "hunter2" not in out
    assert "amqp://omniroute:***@mq.test/" in out


def test_exception_objects_and_handles_in_fields_are_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``error=exc`` is rendered with repr(); X handles in free text are identities too."""
    out = _output(
        capsys,
        "json",
        True,
        lambda: structlog.get_logger("t").warning(
            "x.failed", error=_validation_error(), detail="mention from @AcmeSupport failed"
        ),
    )
    event = json.loads(out)
    assert "ayse@acme.test" not in event["error"]
    assert "AcmeSupport" not in event["detail"]
    assert event["detail"] == "mention from @***port failed"
