"""The one table of channels (issue 14). Sole purpose: say once which channels exist, so that
the process components (``components``, ``--component``), the reload rules, ``omniroute
check``, the senders and the CLI's channel choices are derived, never listed again.

Each entry names the factory that builds the channel as an import string (``module:name``,
as uvicorn names its loops and protocols), imported only once the channel is enabled: a
channel nobody configured never loads its module or its third-party library. Nothing
registers itself as an import side effect.

Adding a channel: its package in ``connectors/``, a ``config/channel_<name>.py`` whose
``build(settings, shared)`` returns an ``ingest.protocols.Channel``, and one line below.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ingest.identities import IdentityKind

if TYPE_CHECKING:
    from pydantic import BaseModel

    from ingest.bus import Bus
    from ingest.health import Health
    from ingest.metrics import Metrics
    from ingest.protocols import (
        CursorStore,
        Decider,
        InboundBatchSink,
        InboundSink,
        Lease,
        SeenStore,
    )


@dataclass(frozen=True)
class Entry:
    """One channel. It is enabled when any ``enabled_by`` key is set (always, when none is
    named); ``component`` is the ``components`` choice that runs its intake and routes (its
    senders run wherever the dispatcher does); ``restart`` names the keys a reload cannot
    apply to it; ``inbound`` maps each message channel it takes in to its senders' identity
    kind."""

    name: str
    factory: str
    component: str
    enabled_by: tuple[str, ...] = ()
    restart: tuple[str, ...] = ()
    inbound: Mapping[str, IdentityKind] = field(default_factory=dict)


#: what every process may run besides the channels, in start order
CORE = ("router", "events", "dispatcher", "timers")
#: keys of the core a reload cannot apply (credentials included: systemd fills
#: $CREDENTIALS_DIRECTORY only at start)
CORE_RESTART = (
    "amqp_url",
    "database_url",
    "state_dir",
    "components",
    "http",
    "bus",
    "spool",
    "dispatch",
    "router",
    "directory",
)

CHANNELS: tuple[Entry, ...] = (
    Entry(
        "twilio",
        "config.channel_twilio:build",
        component="webhooks",
        enabled_by=("twilio.auth_token",),
        restart=("twilio", "routing.default_region"),
        inbound={"sms": "phone", "voice": "phone", "whatsapp": "phone"},
    ),
    Entry(
        "pbx",
        "config.channel_pbx:build",
        component="webhooks",
        restart=("api", "routing.default_region"),
        inbound={"voice": "phone"},
    ),
    Entry(
        "email",
        "config.channel_email:build",
        component="email",
        enabled_by=("email.mailboxes", "smtp"),
        restart=("smtp", "email.message_id_domain"),
        inbound={"email": "email"},
    ),
    Entry(
        "twitter",
        "config.channel_twitter:build",
        component="twitter",
        enabled_by=("twitter",),
        restart=("twitter",),
        inbound={"twitter": "twitter"},
    ),
)

#: the ``components`` choices and ``--component`` spellings, core first
COMPONENTS: tuple[str, ...] = (*CORE, *dict.fromkeys(entry.component for entry in CHANNELS))
#: settings a running process cannot take over: a reload that changes one says so
RESTART_ONLY: tuple[str, ...] = tuple(
    dict.fromkeys([*CORE_RESTART, *(key for entry in CHANNELS for key in entry.restart)])
)
#: every message channel taken in, with the kind of identity its senders have
IDENTITY_KINDS: dict[str, IdentityKind] = {
    channel: kind for entry in CHANNELS for channel, kind in entry.inbound.items()
}


@dataclass(frozen=True)
class Shared:
    """What a channel factory receives besides its settings: the process's collaborators.
    ``spool`` and ``lease`` are made on first use (only webhooks need the spool, only pollers
    a lease) and closed with the process."""

    sink: InboundBatchSink
    spool: Callable[[], InboundSink]
    lease: Callable[[], Lease]
    lease_retry: float
    cursors: CursorStore
    seen: SeenStore
    decider: Decider
    health: Health
    metrics: Metrics
    bus: Bus


def value(settings: BaseModel, key: str) -> object:
    """A dotted settings key's value; None when a section on the way is not configured."""
    node: object = settings
    for part in key.split("."):
        node = getattr(node, part, None)
    return node


def enabled(entry: Entry, settings: BaseModel) -> bool:
    if not entry.enabled_by:
        return True
    return any(value(settings, key) not in (None, [], "") for key in entry.enabled_by)


def load(entry: Entry) -> object:
    """The entry's factory, importing its module (and so its connector) now."""
    module, _, name = entry.factory.partition(":")
    return getattr(importlib.import_module(module), name)
