"""Prometheus metrics of one omniroute daemon, on a registry of its own.

Sole purpose: one ``Metrics`` object, made once by the composition root and handed to each
component, so that two apps (or two tests) in one process never collide on the global
registry. Every name is prefixed ``omniroute_``; labels are bounded sets (channels,
reasons, endpoint paths, queue names), never identities. Team and agent ids, the one
open-ended kind of label value (issue 17), go through ``BoundedLabel``: past
``metrics.max_team_labels`` distinct values, the next ones are counted as ``other``.
Series that describe now rather than count (readiness, connector state, queue depths) are
brought up to date when ``GET /metrics`` asks (``scrape``), not kept in step all the time.
"""

import asyncio
import collections
from collections.abc import Awaitable, Callable, Iterable
from typing import get_args

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ingest.health import Health, State
from ingest.schema import RoutedMessage
from ingest.settings import MetricsSettings

NAMESPACE = "omniroute"
#: routing decisions are database lookups: milliseconds, with a tail into seconds
DECISION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: the label value of every team or agent id past the bound, and of a route with no team
OTHER = "other"
NO_TEAM = "none"
#: a component's states, each a series of ``omniroute_connector_state`` (1 for the current)
STATES: tuple[State, ...] = get_args(State)
#: the stable start of a dead letter's ``x-omniroute-reason`` (``ingest.consumers``,
#: ``ingest.errors.RefusedError``) -> its ``reason`` label value; anything else is "poison"
DEAD_REASONS = {
    "invalid JSON": "invalid_json",
    "schema violation": "schema_violation",
    "bug": "bug",
    "claim refused": "claim_refused",
    "untrusted_publisher": "untrusted_publisher",
    "future_timestamp": "future_timestamp",
    "unknown_agent": "unknown_agent",
    "unknown_customer": "unknown_customer",
}
#: what ``scrape`` awaits before rendering (the broker's queue counts)
ScrapeHook = Callable[[], Awaitable[None]]


def dead_reason(reason: str) -> str:
    """The bounded ``reason`` label of a dead letter's free-text reason."""
    for start, label in DEAD_REASONS.items():
        if reason.startswith(start):
            return label
    return "poison"


class BoundedLabel:
    """Label values of an open-ended kind (team or agent ids): the first ``limit`` distinct
    ones seen keep their own value, later ones become ``other``, so a directory or a
    publisher with many ids cannot grow the series without bound."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str | None) -> str:
        if value is None:
            return NO_TEAM
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit():
            return OTHER
        self._seen.add(value)
        return value


class Metrics:
    """The daemon's metrics; ``render()`` is the body of ``GET /metrics``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, registry: CollectorRegistry | None = None, settings: MetricsSettings | None = None
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        #: replaced as a whole by the composition root (at start and on reload)
        self.settings = settings or MetricsSettings()
        self.teams = BoundedLabel(lambda: self.settings.max_team_labels)
        self.agents = BoundedLabel(lambda: self.settings.max_agent_labels)
        self._health: Health | None = None
        self._connectors: set[str] = set()
        self._hooks: list[ScrapeHook] = []
        r = self.registry
        self.messages_in = Counter(
            "messages_in",
            "Messages accepted from customers",
            ["channel"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.routed = Counter(
            "routed",
            "Messages routed, by policy reason and target kind",
            ["reason", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.decision_seconds = Histogram(
            "decision_seconds",
            "Time to take one routing decision",
            namespace=NAMESPACE,
            registry=r,
            buckets=DECISION_BUCKETS,
        )
        self.spool_depth = Gauge(
            "spool_depth",
            "Messages kept in the local spool while the broker is away",
            namespace=NAMESPACE,
            registry=r,
        )
        self.webhook_responses = Counter(
            "webhook_responses",
            "HTTP responses, by endpoint path and status",
            ["endpoint", "status"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.connector_up = Gauge(
            "connector_up",
            "1 when the connector is up, else 0",
            ["connector"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.dead_lettered = Counter(
            "dead_lettered",
            "Messages sent to omniroute.dead",
            ["queue"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.outbound = Counter(
            "outbound",
            "Replies sent to customers, by channel and result",
            ["channel", "result"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.acks = Counter(
            "acks",
            "Acknowledgements to customers (issue 16), by channel and result: published to "
            "omniroute.outbound, or failed (directory, broker or deadline; the routed message "
            "is acked regardless)",
            ["channel", "result"],
            namespace=NAMESPACE,
            registry=r,
        )

        self.shadow_diff = Counter(
            "shadow_diff",
            "Messages the candidate rules of routing.shadow_rules would have routed elsewhere "
            "(issue 20), by live and candidate target (team.<id>, agent, triage) and the rule "
            "that made the difference",
            ["from", "to", "rule"],
            namespace=NAMESPACE,
            registry=r,
        )

        self._issue17(r)

    def _issue17(self, r: CollectorRegistry) -> None:
        """Issue 17's series: routed messages by channel and team, dead letters by reason,
        readiness, connector state, queues, offers and escalations."""
        self.routed_messages = Counter(
            "routed_messages",
            "Messages published on omniroute.routed and confirmed by the broker (first "
            "decisions and re-routes alike), by channel, team (the target team, or an agent's "
            "team; none for triage), policy reason and target kind",
            ["channel", "team", "reason", "kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.routed_agent = Counter(
            "routed_agent_messages",
            "Messages routed to each agent, by channel (only with metrics.agent_labels)",
            ["channel", "agent"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.dead_by_reason = Counter(
            "dead_lettered_by_reason",
            "Messages omniroute sent to omniroute.dead, by queue and reason class",
            ["queue", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.ready = Gauge(
            "ready",
            "1 when this process answers /readyz with 200, else 0",
            namespace=NAMESPACE,
            registry=r,
        )
        self.connector_state = Gauge(
            "connector_state",
            "1 for the state each component is in now (starting, up, down, stopped, standby)",
            ["connector", "state"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.queue_messages = Gauge(
            "queue_messages",
            "Messages ready in each omniroute queue, asked of the broker at the scrape "
            "(cached for metrics.queue_cache_for)",
            ["queue"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.queue_consumers = Gauge(
            "queue_consumers",
            "Consumers attached to each omniroute queue, from any process",
            ["queue"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.queue_stats_up = Gauge(
            "queue_stats_up",
            "1 when the broker answered the last queue count in time, else 0 (the queue series "
            "are then left out)",
            namespace=NAMESPACE,
            registry=r,
        )
        self.offers_rerouted = Counter(
            "offers_rerouted",
            "Offers to an agent that ended without an acceptance and were routed again, by "
            "channel and reason (offer_timeout, declined)",
            ["channel", "reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.sla_breached = Counter(
            "sla_breached",
            "sla.breached events published: a first answer overdue, by channel and the team "
            "whose first-response time ran out",
            ["channel", "team"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.escalations = Counter(
            "escalations",
            "Overdue messages routed again to the team's escalate_to, by channel and the team "
            "they left",
            ["channel", "team"],
            namespace=NAMESPACE,
            registry=r,
        )

    def count_routed(self, published: Iterable[object]) -> None:
        """Count the routed messages whose publish the broker confirmed (``ingest.bus``)."""
        # counted per distinct label set: a batch repeats a few, and ``labels()`` is the
        # costly part of a count (a lock, a validation of every value)
        agents = self.settings.agent_labels
        by_team: collections.Counter[tuple[str, str | None, str, str]] = collections.Counter()
        by_agent: collections.Counter[tuple[str, str]] = collections.Counter()
        for item in published:
            if not isinstance(item, RoutedMessage):
                continue
            route, channel = item.route, item.message.channel
            team = route.target if route.kind == "team" else route.fallback_team
            by_team[(channel, team, route.reason, route.kind)] += 1
            if agents and route.kind == "agent" and route.target is not None:
                by_agent[(channel, route.target)] += 1
        for (on, team, reason, kind), count in by_team.items():
            self.routed_messages.labels(on, self.teams(team), reason, kind).inc(count)
        for (on, agent), count in by_agent.items():
            self.routed_agent.labels(on, self.agents(agent)).inc(count)

    def dead_letter(self, queue: str, reason: str) -> None:
        """Count a message omniroute dead-letters (``ingest.consumers``), with its reason."""
        self.dead_lettered.labels(queue).inc()
        self.dead_by_reason.labels(queue, dead_reason(reason)).inc()

    def watch(self, health: Health, *hooks: ScrapeHook) -> None:
        """Read readiness and component states from ``health`` at each scrape, and await
        ``hooks`` (each bounds its own time) before rendering."""
        self._health = health
        self._hooks.extend(hooks)

    async def scrape(self) -> bytes:
        """The body of ``GET /metrics``: the series of now brought up to date, rendered."""
        if self._hooks:
            await asyncio.gather(*(hook() for hook in self._hooks))
        if self._health is not None:
            self._states(self._health)
        return self.render()

    def _states(self, health: Health) -> None:
        ready, _ = health.ready()
        self.ready.set(1 if ready else 0)
        components = {name: c.state for name, c in health.components.items()}
        for gone in self._connectors - components.keys():
            self.connector_up.remove(gone)
            for state in STATES:
                self.connector_state.remove(gone, state)
        self._connectors = set(components)
        for name, current in components.items():
            self.connector_up.labels(name).set(1 if current == "up" else 0)
            for state in STATES:
                self.connector_state.labels(name, state).set(1 if state == current else 0)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (``content_type``)."""
        return generate_latest(self.registry)
