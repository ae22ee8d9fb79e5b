"""Logging: structlog, JSON lines when not on a terminal (journald reads them), readable
console output on a terminal. Customer identities under well-known keys are redacted unless
``log.redact = false``; keys that look like secrets are always masked.

Invariant: no text reaches the output without passing ``_mask``. Exceptions (``exc_info``,
``log.exception``) are rendered to plain text *before* it, on both formats and for stdlib
records too, so a traceback or a pydantic ``input_value`` is scrubbed like any field; the
console never prints a traceback's local variables. Passwords in URLs are masked always.
"""

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from ingest.identities import redact

IDENTITY_KEYS = frozenset(
    {"sender", "recipient", "caller", "called", "identity", "to", "from_", "address", "handle"}
)
SECRET_MARKERS = ("password", "token", "secret", "authorization", "api_key")
QUIET_LIBRARIES = {
    "aio_pika": logging.WARNING,
    "aiormq": logging.WARNING,
    "aioimaplib": logging.WARNING,
    "aiosmtplib": logging.WARNING,
    # tweepy logs the bearer token at DEBUG, twilio every request at INFO
    "tweepy": logging.WARNING,
    "twilio": logging.WARNING,
    "twilio.http_client": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "alembic": logging.WARNING,
    "sqlalchemy": logging.WARNING,
    "asyncio": logging.WARNING,
}


#: SQLAlchemy's pool logs an error with a traceback when closing a connection to a database
#: that went away times out or fails; the outage is reported once by omniroute itself
#: (``bus.transient``, ``directory.refresh_failed``), so these go (issue 19: four in one run
#: of bench/faults/db_proxy.py)
_POOL_CLOSE_MESSAGES = ("Exception closing connection %r", "Exception terminating connection %r")


def _not_an_outage_echo(record: logging.LogRecord) -> bool:
    """A handler filter: False for a library's traceback about a database outage."""
    if record.name.startswith("sqlalchemy.pool") and record.msg in _POOL_CLOSE_MESSAGES:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, TimeoutError | OSError)
    return True


# Identities inside free text: third-party error messages ("The 'To' number +90… is not
# valid", an SMTP server echoing the recipient) and exception strings.
_EMAIL_IN_TEXT = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE_IN_TEXT = re.compile(r"\+\d[\d ()-]{6,18}\d")
# An X handle in text; not the domain of an already redacted address ("a***@acme.test").
_HANDLE_IN_TEXT = re.compile(r"(?<![\w@.*/])@([A-Za-z0-9_]{1,15})(?![\w@])")
# scheme://user:password@host: the password of an amqp_url, database_url or proxy URL.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s/@]+@")
# "event" is text too: a stdlib record's message ("Task exception was never retrieved ...").
_NOT_TEXT = frozenset({"timestamp", "level", "logger", "message_id", "channel"})


def hide_secrets(text: str) -> str:
    """Mask the password of every URL in ``text``; kept even with ``log.redact = false``."""
    if "://" in text:
        text = _URL_PASSWORD.sub(r"\1:***@", text)
    return text


def scrub(text: str) -> str:
    """Redact email addresses, international numbers, X handles and URL passwords found
    anywhere in ``text``."""
    text = hide_secrets(text)
    if "@" in text:
        text = _EMAIL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
        text = _HANDLE_IN_TEXT.sub(lambda m: "@" + redact(m.group(1)), text)
    if "+" in text:
        text = _PHONE_IN_TEXT.sub(lambda m: redact(re.sub(r"\D", "", m.group(0))), text)
    return text


_SECRET, _IDENTITY, _TEXT, _AS_IS = range(4)


@functools.lru_cache(maxsize=1024)
def _treatment(key: str) -> int:
    """What a value under ``key`` needs (keys are few and fixed: decided once each)."""
    lowered = key.lower()
    if any(marker in lowered for marker in SECRET_MARKERS):
        return _SECRET
    if lowered in IDENTITY_KEYS:
        return _IDENTITY
    return _AS_IS if lowered in _NOT_TEXT else _TEXT


def _mask(redact_identities: bool) -> structlog.types.Processor:
    def processor(
        _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            treatment = _treatment(key)
            if treatment == _SECRET:
                event[key] = "***"
                continue
            if isinstance(value, BaseException):  # error=exc: rendered as repr() otherwise
                value = repr(value)
            if not isinstance(value, str) or treatment == _AS_IS:
                continue
            if not redact_identities:
                event[key] = hide_secrets(value)
            elif treatment == _IDENTITY:
                event[key] = redact(value)
            else:
                event[key] = scrub(value)
        return event

    return processor


def configure(
    *,
    fmt: str = "auto",
    level: str = "info",
    redact_identities: bool = True,
    libraries: bool = True,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and route the standard library's logging through it.
    ``libraries=False`` keeps the third-party libraries' own records out entirely, whatever
    ``level`` (a command's output is its own, issue 17); omniroute's own lines still come.
    ``stream``: where lines go, stdout by default (the daemon's journal); a command's
    lines go to stderr, so that its stdout is its output alone."""
    out = stream or sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    stamped: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Tracebacks become plain text before _mask sees the event: a renderer that formats
    # exc_info itself (the console's Rich one, with locals) would print them unredacted.
    as_text: list[structlog.types.Processor] = [
        structlog.processors.format_exc_info,
        _mask(redact_identities),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            *stamped,
            structlog.processors.StackInfoRenderer(),
            *as_text,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(out),  # PrintLogger, minus print()
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped, *as_text],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    handler.addFilter(_not_an_outage_echo)
    if not libraries:  # no omniroute code logs through the standard library: only libraries
        handler.setLevel(logging.CRITICAL + 1)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    for name, lib_level in QUIET_LIBRARIES.items():
        logging.getLogger(name).setLevel(max(lib_level, numeric))
