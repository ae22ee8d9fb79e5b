"""Shadow mode (issue 20): every message is decided a second time with the candidate rules
of ``routing.shadow_rules``; the live route is what is published, always.

Sole purpose: where the candidate's routing key differs from the live one, count it
(``omniroute_shadow_diff_total{from,to,rule}``: ``from``/``to`` are ``team.<id>``,
``agent`` (never an agent's id, to bound the labels) or ``triage``; ``rule`` a rule name,
else ``none``), log it once per message (``router.shadow_diff``: the message id, the
routes and the rule; no identity), and record it in ``shadow_diffs`` for ``omniroute rules
diff``. The second decision reuses the facts the live one read, so it costs no query; the
record is one insert per batch that has differences, and a failure to write it is logged
and never fails the batch.
"""

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

import structlog
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from ingest.metrics import Metrics
from ingest.schema import InboundMessage, Route
from routers.models import ShadowDiff
from routers.policy import Facts, decide
from routers.settings import RoutingSettings
from routers.store.sql import insert_for
from routers.store.transactions import Transactions
from routers.store.values import utc

log = structlog.get_logger("omniroute.router")


class Difference(NamedTuple):
    message: InboundMessage
    live: Route
    shadow: Route

    @property
    def rule(self) -> str | None:
        return self.shadow.rule or self.live.rule


def label(route: Route) -> str:
    """A route as a bounded metric label: an agent's id is left out."""
    return "agent" if route.kind == "agent" else route.routing_key


class ShadowWatch:
    """Compares and reports; the decider calls ``compare`` per message, ``report`` per batch."""

    def __init__(self, run: Transactions, metrics: Metrics | None = None) -> None:
        self._run = run
        self._metrics = metrics
        self.differences = 0

    def compare(
        self,
        message: InboundMessage,
        facts: Facts,
        live: Route,
        settings: RoutingSettings,
        now: datetime,
    ) -> Difference | None:
        """The candidate's route where it goes elsewhere than ``live``; None otherwise, or
        when no candidate is configured."""
        candidate = settings.shadow
        if candidate is None:
            return None
        shadow = decide(message, facts, candidate, now)
        return None if shadow.routing_key == live.routing_key else Difference(message, live, shadow)

    async def report(self, differences: Sequence[Difference]) -> None:
        if not differences:
            return
        for d in differences:
            self.differences += 1
            if self._metrics is not None:
                self._metrics.shadow_diff.labels(
                    label(d.live), label(d.shadow), d.rule or "none"
                ).inc()
            log.info(
                "router.shadow_diff",
                message_id=d.message.id,
                channel=d.message.channel,
                live=d.live.routing_key,
                live_reason=d.live.reason,
                shadow=d.shadow.routing_key,
                shadow_reason=d.shadow.reason,
                rule=d.rule,
            )
        rows = [_row(d) for d in differences]
        try:
            await self._run(lambda connection: _insert(connection, rows))
        except SQLAlchemyError as exc:
            log.warning("router.shadow_record_failed", error=f"{type(exc).__name__}: {exc}")


def _row(d: Difference) -> dict[str, Any]:
    return {
        "message_id": d.message.id,
        "at": utc(d.live.decided_at),
        "channel": d.message.channel,
        "live": d.live.routing_key[:210],
        "live_reason": d.live.reason,
        "shadow": d.shadow.routing_key[:210],
        "shadow_reason": d.shadow.reason,
        "rule": d.rule,
    }


def _insert(connection: Connection, rows: list[dict[str, Any]]) -> None:
    stmt = insert_for(connection.dialect.name, ShadowDiff.__table__)  # type: ignore[arg-type]
    connection.execute(stmt.on_conflict_do_nothing(index_elements=["message_id"]), rows)
