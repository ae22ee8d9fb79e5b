"""Component health, shared by every component and read by ``/readyz``, metrics and the watchdog.

Sole purpose: one place where each component says whether it is up, and why not, so that a
mailbox that is down shows in ``/readyz`` without taking the others down with it.
"""

from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Literal

State = Literal["starting", "up", "down", "stopped", "standby"]
#: what a live check watches: the broker connection, a queue consumer, the webhook spool
ProbeKind = Literal["connection", "consumer", "spool"]
#: states that do not make ``/readyz`` fail: "standby" is a poller whose source (a mailbox,
#: an X account) is leased by another live instance, which is how scale-out should look
READY_STATES: frozenset[State] = frozenset({"up", "standby"})


@dataclass
class ComponentHealth:
    state: State = "starting"
    reason: str = ""
    required: bool = True


@dataclass(frozen=True)
class Probe:
    kind: ProbeKind
    #: the problem now, or None when fine; cheap, it runs at every readiness question
    check: Callable[[], str | None]


@dataclass
class Health:
    """The daemon's view of its components; logs are the caller's job, not this class's."""

    components: dict[str, ComponentHealth] = field(default_factory=dict)
    draining: bool = False
    #: live checks read at every readiness question (a consumer still attached, the broker
    #: connection open), by name
    probes: dict[str, Probe] = field(default_factory=dict)
    #: called with (component, state) on every change, e.g. to keep a metric in step
    listeners: list[Callable[[str, State], None]] = field(default_factory=list)

    def register(self, name: str, *, required: bool = True) -> None:
        self.components.setdefault(name, ComponentHealth(required=required))

    def set(self, name: str, state: State, reason: str = "") -> bool:
        """Record a state; returns True when it changed, so callers log only changes."""
        current = self.components.setdefault(name, ComponentHealth())
        changed = current.state != state or current.reason != reason
        current.state = state
        current.reason = reason
        if changed:
            for listener in self.listeners:
                listener(name, state)
        return changed

    def forget(self, name: str) -> None:
        """Drop a component that no longer exists (a mailbox removed on reload)."""
        if self.components.pop(name, None) is not None:
            for listener in self.listeners:
                listener(name, "stopped")

    def add_probe(self, name: str, kind: ProbeKind, check: Callable[[], str | None]) -> None:
        self.probes[name] = Probe(kind, check)

    def drop_probe(self, name: str) -> None:
        self.probes.pop(name, None)

    def probe_problems(self, kind: ProbeKind | None = None) -> list[str]:
        """``"<name>: <problem>"`` for each probe (of ``kind``) that finds one now."""
        return [
            f"{name}: {problem}"
            for name, probe in sorted(self.probes.items())
            if (kind is None or probe.kind == kind) and (problem := probe.check())
        ]

    def ready(self, only: Collection[str] | None = None) -> tuple[bool, list[str]]:
        """Ready when not draining, every probe finds nothing and every required component
        (of ``only``, when given) is up or on standby; else the reasons. A component that
        has not reported yet is "starting": never ready (issue 19)."""
        problems = [
            f"{name}: {c.state}" + (f" ({c.reason})" if c.reason else "")
            for name, c in sorted(self.components.items())
            if c.required and c.state not in READY_STATES and (only is None or name in only)
        ]
        problems += self.probe_problems()
        if self.draining:
            problems.insert(0, "draining")
        return (not problems, problems)

    def snapshot(self) -> dict[str, dict[str, str | bool]]:
        return {
            name: {"state": c.state, "reason": c.reason, "required": c.required}
            for name, c in sorted(self.components.items())
        }
