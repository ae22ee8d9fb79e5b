"""Prometheus metrics of one omniroute daemon, on a registry of its own.

Sole purpose: one ``Metrics`` object, made once by the composition root and handed to each
component, so that two apps (or two tests) in one process never collide on the global
registry. Every name is prefixed ``omniroute_``; labels are bounded sets (channels,
reasons, endpoint paths, queue names), never identities.
"""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

NAMESPACE = "omniroute"
#: routing decisions are database lookups: milliseconds, with a tail into seconds
DECISION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The daemon's metrics; ``render()`` is the body of ``GET /metrics``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
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

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format (``content_type``)."""
        return generate_latest(self.registry)
