"""Ready means ready (issue 19): a malformed URL-like setting is refused when the
configuration loads (``check``, ``run``, a SIGHUP reload), in one line that names the key
and never shows a password; ``/readyz`` and systemd's READY=1 say ready only once the broker
topology is declared on a live connection and every worker consumes, whatever the broker
does before that (absent, silent, malformed)."""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from config.settings import load_settings
from ingest.bus import Bus
from ingest.errors import ConfigError
from ingest.topology import ROUTER_QUEUE
from tests.daemon_fixtures import DaemonProcess
from tests.support.net import TcpProxy, free_port, listening
from tests.support.waiting import until

SECRET = "s3cr3t-pw"


# -- malformed settings, refused at load ---------------------------------------------------

MALFORMED = [
    ("OMNIROUTE_AMQP_URL", f'["amqp://guest:{SECRET}@h:5999/x", "h"]', "amqp_url: node 2: must"),
    ("OMNIROUTE_AMQP_URL", f"amqp://guest:{SECRET}@127.0.0.1:56z2/", "amqp_url: has a port"),
    ("OMNIROUTE_AMQP_URL", f"http://guest:{SECRET}@127.0.0.1:5672/", "amqp_url: must start"),
    ("OMNIROUTE_AMQP_URL", f"amqp://guest:{SECRET}@/vhost", "amqp_url: names no host"),
    ("OMNIROUTE_AMQP_URL", f"amqp://u:{SECRET}@a:5672,b:5672/", "amqp_url: names several"),
    ("OMNIROUTE_AMQP_URL", f"amqp://u:{SECRET}@h/?heartbeat=soon", "amqp_url: has a heartbeat"),
    ("OMNIROUTE_AMQP_URL", f" amqp://u:{SECRET}@h/", "amqp_url: has spaces"),
    ("OMNIROUTE_DATABASE_URL", f"postgres ql://u:{SECRET}@h/db", "database_url: has spaces"),
    ("OMNIROUTE_DATABASE_URL", f"mysql://u:{SECRET}@h/db", "database_url: mysql is not"),
    ("OMNIROUTE_DATABASE_URL", f"postgresql://u:{SECRET}@h:99999/db", "database_url: has a port"),
    ("OMNIROUTE_DATABASE_URL", f"postgresql+psycopg2://u:{SECRET}@h/db", "database_url: driver"),
    ("OMNIROUTE_DATABASE_URL", f"{SECRET}", "database_url: not a database URL"),
    ("OMNIROUTE_HTTP__PUBLIC_URL", "omniroute.example.com", "http.public_url: must start"),
    ("OMNIROUTE_HTTP__PUBLIC_URL", "https://omni route.example.com", "http.public_url: has spaces"),
    ("OMNIROUTE_HTTP__PUBLIC_URL", "https://:443/", "http.public_url: names no host"),
    ("OMNIROUTE_HTTP__HOST", "http://0.0.0.0", "http.host: 'http://0.0.0.0' is a URL"),
    ("OMNIROUTE_TWILIO__API_BASE_URL", "api.twilio.com", "twilio.api_base_url: must start"),
    (
        "OMNIROUTE_SMTP",
        '{"host": "smtp.example.com:465", "from_address": "a@example.com"}',
        "smtp.host: 'smtp.example.com:465' must be a host name or IP address alone",
    ),
    (
        "OMNIROUTE_EMAIL__MAILBOXES",
        '[{"name": "support", "host": "imaps://mail.example.com", "username": "u"}]',
        "email.mailboxes.0.host: 'imaps://mail.example.com' is a URL",
    ),
    (
        "OMNIROUTE_EMAIL__MAILBOXES",
        '[{"name": "support", "host": "mail..example.com", "username": "u"}]',
        "email.mailboxes.0.host: 'mail..example.com' is not a host name",
    ),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.startswith("OMNIROUTE_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)
    return monkeypatch


@pytest.mark.parametrize(("key", "value", "said"), MALFORMED)
def test_a_malformed_url_or_host_is_refused_in_one_line_naming_the_key(
    clean_env: pytest.MonkeyPatch, key: str, value: str, said: str
) -> None:
    """An operator's typo must stop the start with the key named, not start a daemon that
    connects nowhere; the password in a URL never reaches the terminal."""
    clean_env.setenv(key, value)
    with pytest.raises(ConfigError) as refused:
        load_settings(None)
    message = str(refused.value)
    assert said in message
    assert SECRET not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("OMNIROUTE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        ("OMNIROUTE_AMQP_URL", "amqps://u:p%40ss@rabbit.example.com:5671/%2F?heartbeat=10"),
        ("OMNIROUTE_AMQP_URL", "amqp://u:p@[::1]:5672//"),
        ("OMNIROUTE_AMQP_URL", "amqp://rabbit/"),
        ("OMNIROUTE_DATABASE_URL", "postgresql://omniroute:pw@db.example.com:5432/omniroute"),
        ("OMNIROUTE_DATABASE_URL", "postgresql+asyncpg://db/omniroute"),
        ("OMNIROUTE_DATABASE_URL", "sqlite:////var/lib/omniroute/directory.db"),
        ("OMNIROUTE_HTTP__PUBLIC_URL", "https://omniroute.example.com/hooks/"),
        ("OMNIROUTE_HTTP__HOST", "::"),
        ("OMNIROUTE_HTTP__HOST", "localhost"),
        (
            "OMNIROUTE_EMAIL__MAILBOXES",
            '[{"name": "s", "host": "mail.bücher.example", "username": "u"}]',
        ),
    ],
)
def test_well_formed_urls_and_hosts_load(
    clean_env: pytest.MonkeyPatch, key: str, value: str
) -> None:
    """The check refuses typos, not the forms operators really write (IPv6, %-escapes,
    the vhost "/" as // or %2F, international host names)."""
    clean_env.setenv(key, value)
    load_settings(None)


def test_check_and_run_refuse_a_malformed_amqp_url_with_exit_2(daemon: DaemonProcess) -> None:
    """The issue's own example: a JSON list in OMNIROUTE_AMQP_URL started the daemon (a list
    of nodes is read since issue 18: here its second node has no host)."""
    daemon.env["OMNIROUTE_AMQP_URL"] = f'["amqp://guest:{SECRET}@127.0.0.1:5999/x", "amqp://x@/"]'
    for result in daemon.cli_all(("check",), ("run",), timeout=30):
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr.count("\n") == 1, result.stderr
        assert "amqp_url: node 2: names no host" in result.stderr
        assert SECRET not in result.stderr


# -- readiness, watched from the instant HTTP listens ----------------------------------------


class Broker:
    """A loopback port in front of the real broker that accepts TCP and says nothing (the
    AMQP handshake never answered) until ``answer()``; then it forwards to the broker."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.answering = False
        self._server: asyncio.Server | None = None
        self._held: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> "Broker":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._held:
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def answer(self) -> None:
        self.answering = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)
        if not self.answering:
            return  # held open, silent
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._held.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    dst.transport.abort()


class Notifications:
    """systemd's side of sd_notify: a datagram socket recording what the daemon says."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)

    def read(self) -> list[str]:
        with contextlib.suppress(BlockingIOError):
            while True:
                self.seen.append((time.monotonic(), self._sock.recv(4096).decode()))
        return [text for _, text in self.seen]

    def ready_at(self) -> float | None:
        self.read()
        return next((t for t, text in self.seen if "READY=1" in text.split("\n")), None)

    def close(self) -> None:
        self._sock.close()


class Watch:
    """Every ``/readyz`` answer, asked as fast as it answers from the instant the port
    listens: the statuses and when each came."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/readyz"
        self.port = port
        self.answers: list[tuple[float, int]] = []

    async def until(
        self,
        done: Callable[[], bool],
        proc: "subprocess.Popen[bytes]",
        timeout: float,
        what: str,
    ) -> None:
        async with httpx.AsyncClient(timeout=2) as client:

            async def asked() -> bool:
                assert proc.poll() is None, f"the daemon exited ({proc.returncode})"
                if listening(self.port) or self.answers:
                    with contextlib.suppress(httpx.TransportError):
                        status = (await client.get(self.url)).status_code
                        self.answers.append((time.monotonic(), status))
                return done()

            await until(asked, timeout, what)

    def statuses(self) -> set[int]:
        return {status for _, status in self.answers}

    def first_200(self) -> float | None:
        return next((t for t, status in self.answers if status == 200), None)

    def after(self, t: float) -> int:
        return sum(1 for at, _ in self.answers if at > t)


@contextlib.asynccontextmanager
async def started(
    daemon: DaemonProcess, tmp_path: Path, amqp_url: str
) -> AsyncIterator[tuple["subprocess.Popen[bytes]", Watch, Notifications, Path]]:
    """The daemon (every core component) against ``amqp_url``, with a short connect timeout,
    systemd's notify socket, and its HTTP port watched."""
    port = free_port()
    lines = daemon.config.read_text().splitlines()
    lines[0] = f'amqp_url = "{amqp_url}"'
    text = "\n".join(lines).replace("port = 0", f"port = {port}")
    text = text.replace("[routing]", "[bus]\nconnect_timeout = 2\n[routing]")
    daemon.config.write_text(text + "\n", encoding="utf-8")
    notes = Notifications(tmp_path / "notify.sock")
    daemon.env["NOTIFY_SOCKET"] = str(notes.path)
    log = tmp_path / "daemon.log"
    proc = daemon.start(log=log)
    try:
        yield proc, Watch(port), notes, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(proc.wait, 30)
        notes.close()


def _logged(log: Path, event: str) -> int:
    return log.read_text(errors="replace").count(f'"event": "{event}"')


@pytest.mark.slow
async def test_no_200_while_the_broker_is_unreachable(
    daemon: DaemonProcess, tmp_path: Path, vhost: str
) -> None:
    """Nothing listens on the broker's port: /readyz never says ready, READY=1 never comes."""
    url = f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}"
    async with started(daemon, tmp_path, url) as (proc, watch, notes, log):
        await watch.until(
            lambda: _logged(log, "daemon.broker_unreachable") > 0 and len(watch.answers) > 20,
            proc,
            30,
            "the daemon to find the broker unreachable",
        )
        assert watch.statuses() == {503}
        assert notes.ready_at() is None
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
async def test_no_200_while_the_broker_is_silent_then_200_once_it_answers(
    daemon: DaemonProcess, tmp_path: Path, vhost: str, bus: Bus
) -> None:
    """A broker that accepts TCP but never speaks AMQP (a hung node, a wrong port behind a
    load balancer) must not look ready; once it answers, ready comes within seconds, and
    only then: the router consumes by the first 200, READY=1 comes with it. A reload with
    a malformed URL afterwards is refused and the daemon stays ready."""
    async with Broker(("127.0.0.1", 5672)) as broker:
        url = f"amqp://guest:guest@127.0.0.1:{broker.port}/{vhost}"
        async with started(daemon, tmp_path, url) as (proc, watch, notes, log):
            await watch.until(
                lambda: _logged(log, "daemon.broker_unreachable") > 0 and len(watch.answers) > 20,
                proc,
                30,
                "the connect timeout against the silent broker",
            )
            assert watch.statuses() == {503}
            assert notes.ready_at() is None

            given = time.monotonic()
            broker.answer()
            await watch.until(lambda: watch.first_200() is not None, proc, 20, "ready")
            ready = watch.first_200()
            assert ready is not None
            _, consumers = await bus.queue_depth(ROUTER_QUEUE)
            assert consumers >= 1, "200 before the router consumed"
            print(f"ready {ready - given:.2f} s after the broker answered")
            assert ready - given < 10
            await until(lambda: notes.ready_at() is not None, 5, "READY=1")
            ready_note = notes.ready_at()
            assert ready_note is not None
            assert ready_note > given

            # a reload that does not load keeps the old configuration, and readiness
            text = daemon.config.read_text()
            daemon.config.write_text(text.replace(url, f"amqp://guest:{SECRET}@:5672/"))
            proc.send_signal(signal.SIGHUP)
            await until(lambda: _logged(log, "daemon.reload_refused") == 1, 10, "refusal")
            async with httpx.AsyncClient(timeout=2) as client:
                assert (await client.get(watch.url)).status_code == 200
            refusal = next(
                line for line in log.read_text().splitlines() if "daemon.reload_refused" in line
            )
            assert "amqp_url: names no host" in refusal
            assert SECRET not in refusal
    assert "Traceback" not in log.read_text()


@pytest.mark.slow
async def test_a_broker_cut_is_one_log_line_and_readiness_comes_back(
    daemon: DaemonProcess, tmp_path: Path, vhost: str
) -> None:
    """An expected outage is one line (``bus.connection_lost`` with its reason), not the
    broker client's traceback and errors (issue 19: ``tracebacks: 1`` in broker_proxy);
    /readyz says 503 meanwhile and 200 again once the router consumes again."""
    proxy = TcpProxy("127.0.0.1", 5672)
    await proxy.start()
    url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{vhost}"
    try:
        async with started(daemon, tmp_path, url) as (proc, watch, _notes, log):
            await watch.until(lambda: watch.first_200() is not None, proc, 30, "ready")
            await proxy.cut()
            await watch.until(
                lambda: _logged(log, "bus.connection_lost") == 1 and watch.answers[-1][1] == 503,
                proc,
                15,
                "the cut noticed",
            )
            await proxy.restore()
            cut_seen = len(watch.answers)
            await watch.until(
                lambda: any(s == 200 for _, s in watch.answers[cut_seen:]),
                proc,
                30,
                "ready again",
            )
    finally:
        await proxy.cut()
    text = log.read_text()
    assert "Traceback" not in text
    lost = [line for line in text.splitlines() if '"bus.connection_lost"' in line]
    assert len(lost) == 1
    assert '"error": "' in lost[0]
    noisy = [
        line
        for line in text.splitlines()
        if '"logger": "aiormq' in line or '"logger": "aio_pika' in line
    ]
    assert noisy == []
