"""The daemon's logging set back after a test that runs the `omniroute` command in-process:
``config.cli.main`` configures structlog and the root logger to write to the ``sys.stdout``
of that moment, pytest's capture file, which is closed after the test, and a later test's
log line would fail on it."""

import contextlib
import logging
from collections.abc import Iterator

import pytest
import structlog


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """Logging as it was before the block, whatever the block configured."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        structlog.reset_defaults()
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    with kept_logging():
        yield
