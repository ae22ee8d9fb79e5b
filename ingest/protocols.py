"""The small typed contracts between packages; ``config`` hands the implementations over.

``connectors`` and ``routers`` never import each other: the voice webhook and the PBX
route API receive a ``Decider``, the outbound dispatcher receives ``Sender``s, pollers
receive a ``CursorStore``, everything that takes input in receives an ``InboundSink``, and
a connector that reports on its own sends (Twilio's status callbacks) an ``EventSink``.
Each channel shows the daemon one ``Channel``: its intake, routes, senders and check.
"""

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

from ingest.schema import CustomerRef, InboundMessage, OutboundFailed, ReplyRequest, Route

if TYPE_CHECKING:  # types only: a channel without HTTP routes never loads the web stack
    from fastapi import APIRouter
    from starlette.types import Receive, Scope, Send


@dataclass(frozen=True)
class Decision:
    """A routing decision with what a telephone system needs to act on it."""

    customer: CustomerRef | None
    route: Route
    dial: str | None = None
    fallback_dial: str | None = None


@dataclass(frozen=True)
class ReplyContext:
    """What the dispatcher knows about the message a reply answers, if it found it."""

    original: InboundMessage | None = None
    customer_id: str | None = None
    #: an automatic answer, not an agent's (issue 16's acknowledgement): a mail says so
    #: with ``Auto-Submitted: auto-replied`` (RFC 3834), so no responder answers it
    auto_reply: bool = False


@dataclass(frozen=True)
class SendResult:
    """What a channel reports after sending: its own id for the reply, and for email the
    Message-ID it set, recorded as owned by the agent."""

    external_id: str | None = None
    thread_message_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


class InboundSink(Protocol):
    async def submit(self, message: InboundMessage) -> None:
        """Return only once the message is safe: broker-confirmed or fsynced to the spool."""


class InboundBatchSink(InboundSink, Protocol):
    async def submit_many(self, messages: Sequence[InboundMessage]) -> list[BaseException | None]:
        """Submit the messages together: for each, None once it is safe, or what its
        submit failed with; one message's failure is its own. A poller that takes a batch
        at once (IMAP) publishes it in one go instead of a task per message."""


class EventSink(Protocol):
    async def emit(self, event: OutboundFailed, *, message_id: str) -> None:
        """Publish an event onto ``omniroute.events`` under its type; return only once the
        broker confirmed it, else raise ``TransientError``. ``message_id`` deduplicates."""


class Decider(Protocol):
    async def __call__(self, message: InboundMessage) -> Decision:
        """Decide where a message goes, with the same policy the router applies."""

    async def decide_many(
        self, messages: Sequence[InboundMessage], *, context: bool = True
    ) -> list[Decision]:
        """Decisions in message order, the facts of all read together. ``context=False``:
        only what the route needs (no recent contacts), for a caller-ID answer."""


class Sender(Protocol):
    channel: str

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        """Send one reply; raise ``PermanentSendError`` or ``TransientError`` on failure."""


class CursorStore(Protocol):
    async def get(self, key: str) -> str | None:
        """The stored cursor for ``key`` (a mailbox, an X endpoint), if any."""

    async def set(self, key: str, value: str) -> None:
        """Store a cursor durably (committed before returning)."""


class SeenStore(Protocol):
    async def first_time(self, channel: str, external_id: str) -> bool:
        """Record ``(channel, external_id)``; True only the first time it is seen."""

    async def forget(self, channel: str, external_id: str) -> None:
        """Undo ``first_time`` when the message could not be made safe after all."""

    async def first_time_many(self, channel: str, external_ids: Iterable[str]) -> set[str]:
        """Record every ``(channel, external_id)`` in one transaction; the ids seen for the
        first time (each at most once, however often it appears in ``external_ids``)."""

    async def forget_many(self, channel: str, external_ids: Iterable[str]) -> None:
        """Undo ``first_time_many`` for these ids, in one transaction."""


class Lease(Protocol):
    """The right to poll one source (``imap:<mailbox>``, ``twitter:<user_id>``), held by at
    most one live process; it frees itself when the holder dies, so another takes over."""

    async def acquire(self, key: str) -> asyncio.Event | None:
        """Try once without waiting: an event set if the lease is later lost, or None when
        another process holds it. Raises ``TransientError`` when it cannot tell."""

    async def release(self, key: str) -> None:
        """Give the lease up; idempotent, never raises."""


#: an intake loop: takes input until ``stop`` is set, then returns once what it took is safe
#: (the ``run`` of a poller; each also has ``drain()``: take what is waiting now, once, and
#: say how many, as ``ingest.consume.QueueWorker`` has for a queue)
Intake = Callable[[asyncio.Event], Awaitable[None]]
#: one line of ``omniroute check``: what was checked, whether it passed, and why
CheckRow = tuple[str, bool, str]
SettingsT = TypeVar("SettingsT", contravariant=True)


@dataclass(frozen=True)
class HttpRoutes:
    """What a channel serves on the daemon's HTTP port: its FastAPI router, and optionally a
    fast path offered each request before the framework (a hot endpoint, see ``/v1/route``)."""

    router: "APIRouter"
    fast_path: "Callable[[Scope, Receive, Send], Awaitable[bool]] | None" = None


class Channel(Protocol[SettingsT]):
    """One channel's face to the daemon, built by ``config`` from its settings and the shared
    collaborators (issue 14). Every part may be empty, and building one opens nothing: the
    daemon asks only for the parts this process runs, each at most once."""

    name: str

    def intake(self) -> Mapping[str, Intake]:
        """The intake loops, by the name they are supervised and shown in ``/readyz`` under."""

    def routes(self) -> Sequence[HttpRoutes]:
        """The webhooks or APIs it serves."""

    def senders(self) -> Sequence[Sender]:
        """The outbound dispatcher's sender for each channel it answers on."""

    async def check(self) -> list[CheckRow]:
        """``omniroute check``: log in where it can, say what is missing where it cannot."""

    async def reload(self, settings: SettingsT) -> None:
        """Apply what can change live (SIGHUP); the registry names the keys that cannot."""

    async def close(self) -> None:
        """Release what its parts opened; called once, after they have all stopped."""
