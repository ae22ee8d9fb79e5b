"""omniroute's exception tree; connectors translate library errors into these at their edge.

- ``ConfigError``: the configuration is wrong; fixing the file fixes it. Never retried.
- ``AuthError``: credentials were refused (bad password, revoked token). Retrying the
  same credentials will not help: the component stops and reports itself down.
- ``TransientError``: the network, the broker or a peer failed for now; retry with backoff.
- ``PoisonError``: this one input can never be processed; it goes to ``omniroute.dead``
  with the reason and never blocks the queue. ``RefusedError`` is the poison of an input
  that parses but is not believed (an untrusted publisher, a future date, an unknown agent).
- ``PermanentSendError``: an outbound reply was refused for good (invalid recipient).

Only the command line turns an error into ``omniroute: message`` and an exit code.
"""


class OmnirouteError(Exception):
    """Base of every error omniroute raises on purpose."""


class ConfigError(OmnirouteError):
    """The configuration is invalid; the message names the key and the problem."""


class AuthError(OmnirouteError):
    """A peer refused our credentials; retrying the same ones cannot succeed."""


class TransientError(OmnirouteError):
    """A temporary failure: the caller retries with backoff."""


class PoisonError(OmnirouteError):
    """This input can never be processed; dead-letter it with ``str(self)`` as the reason."""


class RefusedError(PoisonError):
    """A well-formed event or request that is not believed; ``code`` is the stable start of
    its dead-letter reason (``untrusted_publisher``, ``future_timestamp``, ``unknown_agent``,
    ``unknown_customer``), what was wrong follows it."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class PermanentSendError(OmnirouteError):
    """The channel refused an outbound reply for good; reported as ``outbound.failed``.
    With a ``code`` (``outside_session_window``), the event's reason is that stable code
    alone, for a ticket system to act on; the detail is logged."""

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.code = code


class UnroutableError(TransientError):
    """The broker returned a mandatory publish: no queue is bound for its routing key."""
