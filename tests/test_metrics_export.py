"""What ``GET /metrics`` exports for people to look at (issue 17): routed messages by channel,
team, reason and kind with a bounded number of team values, dead letters by reason,
readiness, connector states and the broker's queue counts, asked on demand but never more
than once per ``metrics.queue_cache_for`` however many scrape. The exposition passes
``promtool check metrics``, and every series the shipped dashboard and alert rules name
exists in a real daemon's scrape."""

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from ingest.bus import Bus
from ingest.health import Health
from ingest.metrics import OTHER, Metrics, dead_reason
from ingest.queue_stats import QueueStats
from ingest.schema import Identity, InboundMessage, Route, RoutedMessage
from ingest.settings import MetricsSettings
from ingest.topology import DEAD_QUEUE, EVENTS_QUEUE, INBOUND, QUEUES, ROUTED_QUEUE, ROUTER_QUEUE
from routers.models import Customer, CustomerIdentity, Team
from routers.store.engine import create_engine, sessionmaker
from tests.daemon_fixtures import DaemonProcess
from tests.seed import seeded
from tests.support.broker import depth, take
from tests.support.net import free_port
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "config" / "examples"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TEAMS = 50


def routed(channel: str, kind: str, target: str | None, team: str | None = None) -> RoutedMessage:
    message = InboundMessage(
        channel=channel,  # type: ignore[arg-type]
        external_id="x",
        sender=Identity(kind="email", address="a@b.test"),
    )
    route = Route(kind=kind, target=target, reason="dedicated_team", fallback_team=team)  # type: ignore[arg-type]
    return RoutedMessage(message=message, route=route)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_team_and_agent_labels_are_bounded_and_agents_only_when_asked() -> None:
    """A directory with many teams (or a publisher inventing ids) cannot grow the series
    without bound; per-agent series exist only behind metrics.agent_labels."""
    metrics = Metrics(settings=MetricsSettings(max_team_labels=3))
    metrics.count_routed(
        [routed("email", "team", f"t{n}") for n in range(10)]
        + [routed("sms", "agent", "ana", team="t0"), routed("voice", "triage", None), "not routed"]
    )
    teams = {s.labels["team"] for s in _samples(metrics, "omniroute_routed_messages_total")}
    assert teams == {"t0", "t1", "t2", OTHER, "none"}
    assert sample(metrics, "omniroute_routed_messages_total", **_l("email", OTHER)) == 7
    assert sample(metrics, "omniroute_routed_messages_total", **_l("sms", "t0", "agent")) == 1
    assert not _samples(metrics, "omniroute_routed_agent_messages_total")

    metrics.settings = MetricsSettings(agent_labels=True, max_agent_labels=2)
    metrics.count_routed([routed("sms", "agent", f"a{n}", team="t1") for n in range(5)])
    agents = {
        s.labels["agent"]: s.value
        for s in _samples(metrics, "omniroute_routed_agent_messages_total")
    }
    assert agents == {"a0": 1, "a1": 1, OTHER: 3}


def test_dead_letter_reasons_are_a_bounded_set() -> None:
    """The free-text x-omniroute-reason becomes one of a few label values."""
    assert dead_reason("invalid JSON: Expecting value at 0") == "invalid_json"
    assert dead_reason("schema violation: 2 error(s), first at sender") == "schema_violation"
    assert dead_reason("bug: KeyError: 'x'") == "bug"
    assert dead_reason("unknown_agent: agent 'zed' is not in the directory") == "unknown_agent"
    assert dead_reason("claim refused by the directory database: ...") == "claim_refused"
    assert dead_reason("something a PoisonError said") == "poison"


async def test_queue_counts_are_cached_shared_and_left_out_when_unknown(bus: Bus) -> None:
    """Fifty scrapes at once ask the broker once; within queue_cache_for nothing more; a
    queue that is missing is left out without closing the publishers' channel, and a broker
    that cannot be asked leaves every queue series out with queue_stats_up 0."""
    now = [0.0]
    metrics = Metrics(settings=MetricsSettings(queue_cache_for=5))
    stats = QueueStats(bus, metrics, clock=lambda: now[0])
    health = Health()
    health.set("router", "up")
    metrics.watch(health, stats.refresh)
    await asyncio.gather(*(metrics.scrape() for _ in range(50)))
    assert stats.asked == 1
    assert {s.labels["queue"] for s in _samples(metrics, "omniroute_queue_messages")} == set(QUEUES)
    assert sample(metrics, "omniroute_queue_stats_up") == 1
    assert sample(metrics, "omniroute_ready") == 1
    assert sample(metrics, "omniroute_connector_state", connector="router", state="up") == 1

    channel = await bus.connection.channel()
    await channel.queue_delete(EVENTS_QUEUE)
    await channel.close()
    now[0] = 4.9
    await metrics.scrape()
    assert stats.asked == 1, "asked again within queue_cache_for"
    now[0] = 5.0
    await metrics.scrape()
    assert stats.asked == 2
    assert sample(metrics, "omniroute_queue_messages", queue=EVENTS_QUEUE) is None
    assert sample(metrics, "omniroute_queue_consumers", queue=ROUTER_QUEUE) == 0
    message = InboundMessage(
        channel="email", external_id="<m@x>", sender=Identity(kind="email", address="a@b.test")
    )
    await bus.publish(INBOUND, "email", message, message_id=message.id)  # still publishes

    await bus.close()
    now[0] = 10.0
    await metrics.scrape()
    assert sample(metrics, "omniroute_queue_stats_up") == 0
    assert not _samples(metrics, "omniroute_queue_messages")


async def _directory(url: str) -> None:
    """The seed, plus TEAMS teams with one customer each."""
    await seeded(url)
    engine: AsyncEngine = create_engine(url)
    try:
        async with sessionmaker(engine).begin() as session:
            session.add_all([Team(id=f"t{n:02}", name=f"T{n}") for n in range(TEAMS)])
            await session.flush()
            session.add_all(
                [Customer(id=f"c{n:02}", name=f"C{n}", team_id=f"t{n:02}") for n in range(TEAMS)]
            )
            await session.flush()
            session.add_all(
                [
                    CustomerIdentity(
                        kind="email", address=f"c{n:02}@many.test", customer_id=f"c{n:02}"
                    )
                    for n in range(TEAMS)
                ]
            )
    finally:
        await engine.dispose()


async def test_a_daemon_exports_bounded_series_the_dashboard_and_rules_use(
    daemon: DaemonProcess, bus: Bus, sqlite_url: str, tmp_path: Path
) -> None:
    """Through the real daemon and broker: mail from customers of 50 teams, with
    metrics.max_team_labels = 10, makes at most 11 team values; a poison message is counted by
    reason and seen in omniroute.dead's depth; the router's queue shows its consumer; the
    exposition passes promtool; every name the dashboard and the rules use is exported."""
    await _directory(sqlite_url)
    port = free_port()
    text = daemon.config.read_text(encoding="utf-8").replace("port = 0", f"port = {port}")
    daemon.config.write_text(text + "[metrics]\nmax_team_labels = 10\n", encoding="utf-8")
    proc = daemon.start("router", log=tmp_path / "daemon.log")

    mails = [
        InboundMessage(
            channel="email",
            external_id=f"<m{n}@many.test>",
            sender=Identity(kind="email", address=f"c{n:02}@many.test"),
        )
        for n in range(TEAMS)
    ]
    for message in mails:
        await bus.publish(INBOUND, "email", message, message_id=message.id)
    await bus.publish_body(INBOUND, "email", b"{not json", message_id="poison-1", type_=None)
    got = await take(bus, ROUTED_QUEUE, TEAMS, 20)
    assert {g.routing_key for g in got} == {f"team.t{n:02}" for n in range(TEAMS)}
    await until(lambda: _dead(bus), 10, "the poison dead-lettered")

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        await until(lambda: _ready(client), 20, "/readyz 200")
        body = (await client.get("/metrics")).text
    assert proc.poll() is None

    families = {f.name: f for f in text_string_to_metric_families(body)}
    routed_samples = [
        s for s in families["omniroute_routed_messages"].samples if s.name.endswith("_total")
    ]
    teams = {s.labels["team"] for s in routed_samples}
    assert len(teams) == 11, teams
    assert OTHER in teams
    assert sum(s.value for s in routed_samples) == TEAMS
    assert {
        (s.labels["channel"], s.labels["reason"], s.labels["kind"]) for s in routed_samples
    } == {("email", "dedicated_team", "team")}
    assert (
        _value(
            families,
            "omniroute_dead_lettered_by_reason_total",
            queue=ROUTER_QUEUE,
            reason="invalid_json",
        )
        == 1
    )
    assert _value(families, "omniroute_ready") == 1
    assert _value(families, "omniroute_connector_state", connector="router", state="up") == 1
    assert _value(families, "omniroute_queue_stats_up") == 1
    assert _value(families, "omniroute_queue_consumers", queue=ROUTER_QUEUE) >= 1
    assert _value(families, "omniroute_queue_messages", queue=DEAD_QUEUE) == 1
    assert _value(families, "omniroute_decision_seconds_count") >= TEAMS

    linted = await asyncio.to_thread(
        subprocess.run,
        [PROMTOOL, "check", "metrics"],
        input=body,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr

    exported = _exported(body)
    board = json.loads((EXAMPLES / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    rules = (EXAMPLES / "prometheus-alerts.yml").read_text(encoding="utf-8")
    named = set(re.findall(r"\bomniroute_[a-z_]+", "\n".join([*exprs, rules])))
    assert named, "no omniroute series named"
    assert named <= exported, f"not exported: {sorted(named - exported)}"


def _exported(body: str) -> set[str]:
    """Every sample name the exposition declares, whether or not it has a sample yet."""
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            base = name.removesuffix("_total")
            names |= {name, base + "_total"} if kind == "counter" else {name}
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


async def _dead(bus: Bus) -> bool:
    return await depth(bus, DEAD_QUEUE) >= 1


async def _ready(client: httpx.AsyncClient) -> bool:
    return (await client.get("/readyz")).status_code == 200


def _l(channel: str, team: str, kind: str = "team") -> dict[str, str]:
    return {"channel": channel, "team": team, "reason": "dedicated_team", "kind": kind}


def _samples(metrics: Metrics, name: str) -> list:  # type: ignore[type-arg]
    return [s for f in metrics.registry.collect() for s in f.samples if s.name == name]


def _value(families: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    """The value of the sample called ``name`` (``_total``, ``_count`` included) with ``labels``."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no {name} {labels}")
