"""Several broker nodes (issue 18): ``amqp_url`` as a list, connecting to the first node that
answers, reconnecting to another when a connection is lost; and the daemon on a real
three-node RabbitMQ cluster of the test's own, losing the node it is connected to, and the
leader of ``omniroute.router``, under steady load, with nothing lost."""

import json
import os
import signal
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from pydantic import SecretStr

from config.settings import Settings, load_settings
from ingest.amqp import amqp_nodes, redact_url
from ingest.errors import ConfigError, TransientError
from ingest.topology import INBOUND, QUEUES, ROUTER_QUEUE
from tests.daemon_fixtures import ROOT, DaemonProcess
from tests.seed import seeded
from tests.support import broker
from tests.support.cluster import Cluster, available, running_cluster
from tests.support.net import TcpProxy, free_port
from tests.support.traffic import connected_to, inbound, node_loss, outage
from tests.support.waiting import until

SECRET = "s3cr3t-pw"

# -- the setting -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        f'["amqp://u:{SECRET}@a:5672/v", "amqp://u:{SECRET}@b:5672/v"]',
        f"amqp://u:{SECRET}@a:5672/v,amqp://u:{SECRET}@b:5672/v",
        f"amqp://u:{SECRET}@a:5672/v, amqp://u:{SECRET}@b:5672/v",
    ],
)
def test_amqp_url_names_several_nodes_in_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A JSON list or URLs joined by commas: the nodes, kept as one secret."""
    monkeypatch.setenv("OMNIROUTE_AMQP_URL", value)
    url = load_settings(None).amqp_url.get_secret_value()
    assert amqp_nodes(url) == [f"amqp://u:{SECRET}@a:5672/v", f"amqp://u:{SECRET}@b:5672/v"]
    assert SECRET not in redact_url(url)


def test_amqp_url_as_a_toml_list_and_one_url_as_before(tmp_path: Path) -> None:
    """The TOML list form; one URL stays exactly what it was."""
    path = tmp_path / "omniroute.toml"
    path.write_text('amqp_url = ["amqp://u:p@a/v", "amqp://u:p@b:5673/v"]\n')
    assert amqp_nodes(load_settings(path).amqp_url.get_secret_value()) == [
        "amqp://u:p@a/v",
        "amqp://u:p@b:5673/v",
    ]
    one = Settings(amqp_url=SecretStr("amqp://u:p@a:5672/v?heartbeat=5"))
    assert one.amqp_url.get_secret_value() == "amqp://u:p@a:5672/v?heartbeat=5"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[]", "names no node"),
        (f'["amqp://u:{SECRET}@a/v", "http://u:{SECRET}@b/v"]', "node 2: must start"),
        (f'["amqp://u:{SECRET}@a/v", "amqp://u:{SECRET}@a/v"]', "names a node twice"),
        (f'["amqp://u:{SECRET}@a/v", "amqp://w:{SECRET}@b/v"]', "names nodes that differ"),
        (f'["amqp://u:{SECRET}@a/v", "amqp://u:{SECRET}@b/w"]', "names nodes that differ"),
        (f'["amqp://u:{SECRET}@a/v", 5]', "is a list with something else"),
        (f'["amqp://u:{SECRET}@a/v"', "is not a JSON list"),
        (f"amqp://u:{SECRET}@a:5672,b:5672/", "names several nodes in one URL"),
    ],
)
def test_a_bad_node_list_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    """Each node is checked as one URL is, and the nodes must be one cluster's."""
    monkeypatch.setenv("OMNIROUTE_AMQP_URL", value)
    with pytest.raises(ConfigError) as caught:
        load_settings(None)
    assert f"amqp_url: {problem}" in str(caught.value)
    assert SECRET not in str(caught.value)


# -- two "nodes" on the machine's broker, through proxies --------------------------------------


async def test_the_bus_connects_to_a_node_that_answers_and_moves_on_when_it_is_lost(
    vhost: str,
) -> None:
    """A node that is down is skipped at start, whatever the shuffled order; a lost
    connection comes back on the other node, and publishing with confirms goes on there."""
    first, second = TcpProxy("127.0.0.1", 5672), TcpProxy("127.0.0.1", 5672)
    await first.start()
    await second.start()
    dead = free_port()
    urls = [f"amqp://guest:guest@127.0.0.1:{p}/{vhost}" for p in (dead, first.port, second.port)]
    try:
        for _ in range(4):  # the order is shuffled: never the dead node
            async with broker.opened_bus(",".join(urls[:2]), name="nodes-test") as bus:
                assert bus.node == f"127.0.0.1:{first.port}"
        async with broker.opened_bus(",".join(urls[1:]), name="nodes-test") as bus:
            was = bus.node
            assert was is not None
            lost = first if was.endswith(f":{first.port}") else second
            await lost.cut()  # that node is gone, and stays gone
            message = inbound(0, "nodes")

            async def confirmed() -> bool:
                try:
                    await bus.publish(INBOUND, "sms", message, message_id=message.id)
                except TransientError:
                    return False
                return True

            await until(confirmed, 30, "a publish confirmed on the other node")
            assert bus.node != was
            assert bus.connected
            assert await broker.depth(bus, ROUTER_QUEUE) == 1
    finally:
        await first.cut()
        await second.cut()


# -- a real three-node cluster ---------------------------------------------------------------


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three RabbitMQ nodes of the session's own on loopback, joined (about 20 s)."""
    if (why := available()) is not None:
        pytest.skip(why)
    with running_cluster(tmp_path_factory.mktemp("rabbitmq-cluster")) as started:
        yield started


def _config(path: Path, urls: list[str], database_url: str) -> Path:
    lines = [
        f"amqp_url = {json.dumps(urls)}",  # a TOML list
        f'database_url = "{database_url}"',
        f'state_dir = "{path.parent / "state"}"',
        "shutdown_timeout = 10",
        "[bus]",
        "publish_timeout = 5",
        "connect_timeout = 5",
        "[routing]",
        'default_region = "TR"',
        "[http]",
        'host = "127.0.0.1"',
        f"port = {free_port()}",
        "[log]",
        'format = "json"',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)  # with the cluster's start: 150 s was seen to run out under load
# the suite's short node stop (issue 18); the router queue's leader stopping and a node
# paused with SIGSTOP run in bench/faults/cluster_node_loss.py (docs/RELIABILITY.md (g))
@pytest.mark.parametrize("victim", ["connected"])
async def test_the_daemon_loses_a_broker_node_under_load_and_loses_no_message(
    cluster: Cluster, tmp_path: Path, sqlite_url: str, victim: str
) -> None:
    """The issue's node loss: quorum queues on three replicas, the daemon given all three
    nodes, 100 inbound messages a second; the node the daemon is on (or the one leading
    omniroute.router) stops. Nothing offered is lost, duplicates are reported, routing
    resumes within 10 s of the stop."""
    vhost = f"omniroute-cluster-{uuid.uuid4().hex[:8]}"
    cluster.nodes[0].ctl("add_vhost", vhost)
    cluster.nodes[0].ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    urls = cluster.urls(vhost)
    async with broker.opened_bus(",".join(urls), name="topology"):
        pass  # the topology, declared through one node of the list
    for queue in QUEUES:
        assert len(cluster.members(queue, vhost)) == 3, queue
    await seeded(sqlite_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    env["PYTHONPATH"] = str(ROOT)
    daemon = DaemonProcess(_config(tmp_path / "omniroute.toml", urls, sqlite_url), env)
    # the leader's loss alone: started again until the daemon is on another node
    avoid = cluster.leader(ROUTER_QUEUE, vhost) if victim == "router_leader" else None
    try:
        for attempt in range(10):
            log = tmp_path / f"daemon{attempt}.log"
            proc = daemon.start("router", log=log)
            await until(partial(connected_to, log), 30, "the daemon connected")
            if avoid is None or connected_to(log) != f"127.0.0.1:{avoid.port}":
                break
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        result = await node_loss(cluster, vhost, victim)
        proc.send_signal(signal.SIGTERM)  # drained, its log complete
        assert proc.wait(timeout=30) == 0
    finally:
        daemon.stop_all()
        cluster.nodes[0].ctl("delete_vhost", vhost)
    result["daemon_outage_s"] = outage(log)
    print("\n" + json.dumps(result))  # noqa: T201 -- the figures, seen with -s
    assert result["lost"] == 0, result
    assert result["unexpected"] == 0, result
    assert result["recover_s"] <= 10, result
    text = log.read_text()
    assert "Traceback" not in text
    if victim == "connected":
        assert result["daemon_now_on"] != result["stopped"], result
        # the stop is one loss; a surviving node may drop the new connection once more while
        # the quorum queues elect new leaders (seen: INTERNAL_ERROR 9 ms after reconnecting),
        # and the daemon moves on again: each loss is followed by a reconnection, no flapping
        losses = text.count('"bus.connection_lost"')
        assert 1 <= losses <= 2, text
        assert text.count('"bus.reconnected"') == losses, text
