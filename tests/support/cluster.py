"""A RabbitMQ cluster of three nodes of its own on loopback (issue 18), from Debian's
``rabbitmq-server``, for the cluster test and ``bench/faults/cluster_node_loss.py``.

Each node has its own name (``omnitest<N>-<suffix>@localhost``), AMQP and Erlang
distribution ports, data, log and config files under one work directory, and the
management plugin off; the three share one Erlang cookie (``HOME/.erlang.cookie`` in the
work directory) and the machine's epmd. The machine's own broker (``rabbit@localhost`` on
5672) is never touched: every command names one of our nodes with ``-n``, and the scripts
run as they are (``/usr/lib/rabbitmq/bin``), not through Debian's wrapper in ``/usr/sbin``,
which switches to the ``rabbitmq`` user and its home, hence its cookie.
"""

import concurrent.futures
import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path("/usr/lib/rabbitmq/bin")


def available() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if not (BIN / "rabbitmq-server").is_file():
        return f"no {BIN}/rabbitmq-server (apt-get install rabbitmq-server)"
    return None


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_base(count: int) -> int:
    """A base port with ``count`` AMQP ports, ``count`` distribution ports and the CLI's
    distribution range (+10000) all free; from a fixed range, as the CLI's range is the
    distribution port + 10000 and must stay under 65536."""
    for base in range(27100, 29900, 50):
        wanted = [base + i for i in range(count)] + [base + 20 + i for i in range(count)]
        wanted += [base + 10020 + i for i in range(12)]
        if all(_free(p) for p in wanted):
            return base
    raise RuntimeError("no free ports for a test cluster in 27100-29900")


@dataclass
class Node:
    name: str
    port: int
    dist_port: int
    base: Path
    home: Path
    cli_ports: tuple[int, int]
    proc: "subprocess.Popen[bytes] | None" = None

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(self.home),
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_CTL_DIST_PORT_MIN=str(self.cli_ports[0]),
            RABBITMQ_CTL_DIST_PORT_MAX=str(self.cli_ports[1]),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.base / "pid"),
            ERL_EPMD_ADDRESS="127.0.0.1",
            # the distribution listener on loopback too, as the machine's broker has it
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
            # three nodes (and the machine's broker) share two cores: no scheduler busy-waits
            " +sbwt none +sbwtdcpu none +sbwtdio none",
        )
        return env

    def write(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")  # no management plugin
        (self.base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's

    def start(self) -> None:
        self.write()
        with (self.base / "server.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "rabbitmq-server")],
                env=self.env,
                cwd=self.base,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )

    def ctl(self, *args: str, timeout: float = 60, tool: str = "rabbitmqctl") -> str:
        """``rabbitmqctl -n <this node> -q args`` (or another CLI tool); what it printed."""
        done = subprocess.run(
            [str(BIN / tool), "-n", self.name, "-q", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{tool} -n {self.name} {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def wait_started(self, timeout: float = 60) -> None:
        self.ctl("wait", "--timeout", str(int(timeout)), str(self.base / "pid"), timeout=timeout)

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "60", timeout=70)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole node (SIGSTOP: it hangs, its sockets open and silent, as
        a partitioned node looks to its peers and clients; SIGCONT: it goes on)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """Stop the whole node (its process group), at once."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def client_connections(self) -> list[tuple[int, str]]:
        """``(server port, connection_name)`` of every client connection of the cluster (as
        this node sees them: ``list_connections`` lists the whole cluster's)."""
        out = self.ctl("list_connections", "--no-table-headers", "port", "client_properties")
        found = []
        for line in out.splitlines():
            port, _, properties = line.partition("\t")
            name = re.search(r'\{"connection_name","([^"]*)"\}', properties)
            if port.strip().isdigit() and name:
                found.append((int(port), name.group(1)))
        return found


class Cluster:
    """Three (``size``) nodes joined into one cluster; ``urls`` are their AMQP URLs."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        suffix = secrets.token_hex(3)
        base = _port_base(size)
        home = workdir / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        self.workdir = workdir
        self.nodes = [
            Node(
                name=f"omnitest{i + 1}-{suffix}@localhost",
                port=base + i,
                dist_port=base + 20 + i,
                base=workdir / f"node{i + 1}",
                home=home,
                cli_ports=(base + 10020, base + 10031),
            )
            for i in range(size)
        ]

    def start(self, timeout: float = 90) -> float:
        """Start every node at once, wait for them, join the others to the first; the
        seconds it took."""
        began = time.monotonic()
        for node in self.nodes:
            node.start()
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda n: n.wait_started(timeout), self.nodes))
        first, others = self.nodes[0], self.nodes[1:]
        with concurrent.futures.ThreadPoolExecutor(len(self.nodes)) as pool:
            # stopping and starting the joining nodes' apps at once: each is seconds; the
            # joins themselves one after the other, as they change the cluster's membership
            list(pool.map(lambda n: n.ctl("stop_app"), others))
            for node in others:
                node.ctl("join_cluster", first.name)
            list(pool.map(lambda n: n.ctl("start_app"), others))
        running = first.ctl("eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(len(self.nodes)):
            raise RuntimeError(
                f"cluster formed with {running} running nodes, not {len(self.nodes)}"
            )
        return time.monotonic() - began

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def url(self, node: Node, vhost: str = "") -> str:
        return f"amqp://guest:guest@127.0.0.1:{node.port}/{vhost}"

    def urls(self, vhost: str = "") -> list[str]:
        return [self.url(node, vhost) for node in self.nodes]

    def node_of(self, connection_name: str) -> Node | None:
        """The node a client named ``connection_name`` is connected to, by the port it
        connected to (each node listens on its own)."""
        for node in self.nodes:
            try:
                connections = node.client_connections()
            except RuntimeError:  # a stopped app answers nothing: ask the next node
                continue
            ports = {port for port, name in connections if name == connection_name}
            return next((n for n in self.nodes if n.port in ports), None)
        return None

    def leader(self, queue: str, vhost: str = "/") -> Node:
        """The node that leads quorum queue ``queue`` now."""
        for node in self.nodes:
            with contextlib.suppress(RuntimeError):
                out = node.ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "leader")
                for line in out.splitlines():
                    name, _, leader = line.partition("\t")
                    if name == queue:
                        return next(n for n in self.nodes if n.name == leader.strip())
        raise RuntimeError(f"no node knows the leader of {queue}")

    def members(self, queue: str, vhost: str = "/") -> list[str]:
        """The nodes that hold a replica of quorum queue ``queue``."""
        out = self.nodes[0].ctl("list_queues", "-p", vhost, "--no-table-headers", "name", "members")
        for line in out.splitlines():
            name, _, members = line.partition("\t")
            if name == queue:
                return re.findall(r"[\w.-]+@[\w.-]+", members)
        raise RuntimeError(f"no queue {queue}")


@contextlib.contextmanager
def running_cluster(workdir: Path, size: int = 3) -> Iterator[Cluster]:
    """A started cluster, its nodes killed and their files deleted when the block ends."""
    cluster = Cluster(workdir, size)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
