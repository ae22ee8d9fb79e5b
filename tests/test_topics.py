"""Topic rules end to end (issue 20): the real router on the real broker routes an unknown
sender's invoice mail by topic, leaves a known customer with their own team unless a rule
overrides the owner, and with a shadow candidate counts, records and summarises what would
have moved without ever changing the live route; the daemon refuses a rule naming a team
the directory lacks and takes new rules on SIGHUP."""

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from config.cli import main
from ingest.bus import Bus
from ingest.metrics import Metrics
from ingest.schema import Identity, InboundMessage, RoutedMessage
from ingest.topology import INBOUND, ROUTED_QUEUE
from routers.models import Customer, CustomerIdentity, ShadowDiff, Team
from routers.settings import RoutingSettings
from routers.shadow import ShadowWatch
from routers.store.engine import sessionmaker
from routers.store.transactions import transactions_of
from tests.daemon_fixtures import DaemonProcess
from tests.seed import seed, seeded
from tests.support.broker import take
from tests.support.logs import kept_logging
from tests.support.waiting import until
from tests.test_router import Routing

RULES = [
    {"name": "fatura", "keywords": ["fatura", "invoice"], "team": "billing"},
    {"name": "iptal", "keywords": "iptal", "team": "billing", "override_owner": True},
]
CANDIDATE = '[[rules]]\nname = "fatura-accounts"\nkeywords = ["fatura"]\nteam = "accounts"\n'


async def _directory(engine: AsyncEngine) -> None:
    """The seed, plus a hosting team with a customer and an accounts team."""
    await seed(engine)
    async with sessionmaker(engine).begin() as session:
        session.add_all(
            [
                Team(id="hosting", name="Hosting", dial=None, email=None),
                Team(id="accounts", name="Accounts", dial=None, email=None),
            ]
        )
        await session.flush()
        session.add(Customer(id="host1", name="Host", team_id="hosting"))
        await session.flush()
        session.add(CustomerIdentity(kind="email", address="it@host.test", customer_id="host1"))


def mail(sender: str, subject: str, n: int) -> InboundMessage:
    return InboundMessage(
        channel="email",
        external_id=f"<topic-{n}@{sender}>",
        sender=Identity(kind="email", address=sender),
        subject=subject,
    )


@pytest.fixture
async def shadowed(bus: Bus, engine: AsyncEngine, tmp_path: Path) -> AsyncIterator[Routing]:
    await _directory(engine)
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(CANDIDATE, encoding="utf-8")
    settings = RoutingSettings.model_validate(
        {"default_region": "TR", "rules": RULES, "shadow_rules": str(candidate)}
    )
    r = Routing(bus, engine, settings)
    r.metrics = Metrics()  # type: ignore[attr-defined]
    r.decider.shadow = ShadowWatch(transactions_of(engine), r.metrics)  # type: ignore[attr-defined]
    await r.start()
    yield r
    await r.close()


async def test_topic_routes_and_the_shadow_never_changes_the_live_route(
    shadowed: Routing,
    engine: AsyncEngine,
    sqlite_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Faturamı from a stranger: team.billing by rule fatura (the candidate would send it to
    accounts: counted, recorded, summarised); a hosting customer's fatura stays with hosting
    in both sets; their iptal is taken by the override rule."""
    sent = [
        mail("stranger@nowhere.test", "Faturamı ödeyemiyorum", 1),
        mail("it@host.test", "fatura", 2),
        mail("it@host.test", "Hizmeti İPTAL edin", 3),
        mail("other@nowhere.test", "merhaba", 4),
    ]
    for message in sent:
        await shadowed.bus.publish(INBOUND, "email", message, message_id=message.id)
    got = await take(shadowed.bus, ROUTED_QUEUE, len(sent), 15)
    routes = {g.message_id: g.model(RoutedMessage).route for g in got}
    first, second, third, fourth = (routes[m.id] for m in sent)
    assert (first.routing_key, first.reason, first.rule) == ("team.billing", "topic", "fatura")
    assert (second.routing_key, second.reason, second.rule) == (
        "team.hosting",
        "dedicated_team",
        None,
    )
    assert (third.routing_key, third.reason, third.rule) == ("team.billing", "topic", "iptal")
    assert (fourth.routing_key, fourth.reason) == ("triage", "unknown_sender")

    metrics: Metrics = shadowed.metrics  # type: ignore[attr-defined]
    counted = metrics.registry.get_sample_value(
        "omniroute_shadow_diff_total",
        {"from": "team.billing", "to": "team.accounts", "rule": "fatura-accounts"},
    )
    assert counted == 1
    rows = await transactions_of(engine)(lambda c: list(c.execute(select(ShadowDiff))))
    assert sorted((r.message_id, r.live, r.shadow, r.rule) for r in rows) == sorted(
        [
            (sent[0].id, "team.billing", "team.accounts", "fatura-accounts"),
            # the candidate has no iptal rule: that message would have stayed with hosting
            (sent[2].id, "team.billing", "team.hosting", "iptal"),
        ]
    )

    config = tmp_path / "omniroute.toml"
    config.write_text(f'database_url = "{sqlite_url}"\n', encoding="utf-8")
    with kept_logging():  # the workers go on logging after the test's capture closed
        code = await asyncio.to_thread(
            main, ["--config", str(config), "rules", "diff", "--since", "1h"]
        )
    assert code == 0


def _rule(team: str) -> str:
    return (
        f'\n[[routing.rules]]\nname = "servers"\nkeywords = ["sunucu", "server"]\nteam = "{team}"\n'
    )


async def _route_one(bus: Bus, n: int) -> str:
    message = mail(f"stranger{n}@nowhere.test", "Sunucum çöktü", n)
    await bus.publish(INBOUND, "email", message, message_id=message.id)
    [got] = await take(bus, ROUTED_QUEUE, 1, 20, keep=lambda got: got.message_id == message.id)
    return got.routing_key


async def test_daemon_checks_rule_teams_and_takes_new_rules_on_sighup(
    daemon: DaemonProcess, bus: Bus, sqlite_url: str, tmp_path: Path
) -> None:
    """A rule naming a team the directory lacks stops the start in one line (exit 2) and is
    refused on reload (the old rules go on); SIGHUP applies changed rules to the next
    decision."""
    await seeded(sqlite_url)
    good = daemon.config.read_text(encoding="utf-8")
    daemon.config.write_text(good + _rule("nosuch"), encoding="utf-8")
    refused = await asyncio.to_thread(daemon.cli, "run", "--component", "router")
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        "omniroute: routing.rules: rule 'servers' names team 'nosuch', which is not in the "
        "directory"
    )

    daemon.config.write_text(good + _rule("network"), encoding="utf-8")
    log = tmp_path / "daemon.log"
    proc = daemon.start("router", log=log)
    assert await _route_one(bus, 1) == "team.network"

    daemon.config.write_text(good + _rule("billing"), encoding="utf-8")
    proc.send_signal(signal.SIGHUP)
    await until(lambda: '"daemon.reloaded"' in log.read_text(), 10, "the reload applied")
    assert await _route_one(bus, 2) == "team.billing"

    daemon.config.write_text(good + _rule("nosuch"), encoding="utf-8")
    proc.send_signal(signal.SIGHUP)
    await until(lambda: '"daemon.reload_refused"' in log.read_text(), 10, "the reload refused")
    assert await _route_one(bus, 3) == "team.billing", "the old rules go on"

    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 25) == 0
    assert "Traceback" not in log.read_text()
