"""docs/PBX.md's Kamailio snippet, taken from the doc as it stands, run in a real Kamailio
(Debian's ``kamailio`` and ``kamailio-utils-modules``; scripts/test installs them) on
loopback, asking a real omniroute HTTP server (issue 17).

A caller here is a few lines of SIP over UDP; the PBX behind Kamailio is a UDP socket that
answers every INVITE ``486 <user> busy``, so the caller hears where the call was relayed
and the PBX side records the Request-URI it got.
"""

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.http import HttpServer, build_app
from connectors.pbx.routes import PbxRoutes
from connectors.settings import ApiSettings, HttpSettings
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import InboundMessage
from routers.csv.importer import import_csv
from routers.decider import DirectoryDecider
from routers.settings import RoutingSettings
from tests.pbx.sip import LOCAL, Pbx, Phone
from tests.phone_fixtures import API_TOKEN, REGION, seed_directory
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "PBX.md"
TEMPLATE = Path(__file__).with_name("kamailio.cfg")
DOC_MARKER = "<!-- tests/pbx/test_kamailio.py runs the next block"
TEMPLATE_MARKER = "# @OMNIROUTE_SNIPPET@"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
TIMEOUT = 2.0  # the doc's http_client connection_timeout


def doc_snippet() -> str:
    """The fenced block right after the marker comment in docs/PBX.md, verbatim."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(DOC_MARKER))
    assert lines[start + 1].startswith("```"), "the marker must sit right above the block"
    end = lines.index("```", start + 2)
    return "\n".join(lines[start + 2 : end]) + "\n"


def modules_dir() -> Path:
    found = sorted(Path("/usr/lib").glob("*/kamailio/modules/http_client.so"))
    found += sorted(Path("/usr/lib/kamailio/modules").glob("http_client.so"))
    missing = "needs Debian's kamailio and kamailio-utils-modules (scripts/test installs them)"
    assert found, missing
    assert os.access(KAMAILIO, os.X_OK), missing
    return found[0].parent


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOCAL, 0))
        port: int = sock.getsockname()[1]
    return port


class Kamailio:
    """One Kamailio in the foreground (``-DD -E``) with its own config, runtime directory and
    loopback port; never the system service."""

    def __init__(self, tmp_path: Path, defines: dict[str, str]) -> None:
        self.port = free_udp_port()
        self.dir = tmp_path / f"kamailio-{self.port}"
        (self.dir / "run").mkdir(parents=True)
        self.config = self.dir / "kamailio.cfg"
        template = TEMPLATE.read_text(encoding="utf-8")
        assert TEMPLATE_MARKER in template
        self.config.write_text(template.replace(TEMPLATE_MARKER, doc_snippet()), encoding="utf-8")
        self.log = self.dir / "kamailio.log"
        self.args = [KAMAILIO, "-f", str(self.config), "-DD", "-E", "-m", "32", "-M", "4"]
        self.args += ["-l", f"udp:{LOCAL}:{self.port}", "-L", str(modules_dir())]
        self.args += ["-Y", str(self.dir / "run")]
        for name, value in defines.items():
            self.args += ["-A", f'{name}="{value}"']
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(  # noqa: S603 -- our own argument list
                self.args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def stop(self) -> None:
        """SIGTERM to the main process (it ends its children); SIGKILL to its own process
        group if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def log_tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])

    async def ready(self, phone: Phone) -> None:
        """Bounded wait until it answers an OPTIONS: it parsed the config and listens."""

        async def answers() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"kamailio exited:\n{self.log_tail()}"
            return await phone.options(self.port)

        await until(answers, 15, f"kamailio on udp port {self.port}")


class Recorded:
    """Where /v1/route records the calls it was asked about (the broker's place here)."""

    def __init__(self) -> None:
        self.messages: list[InboundMessage] = []

    async def submit(self, message: InboundMessage) -> None:
        self.messages.append(message)


Started = Callable[[str], Awaitable[Kamailio]]


@pytest.fixture
def phone() -> Iterator[Phone]:
    caller = Phone()
    yield caller
    caller.close()


@pytest.fixture
async def pbx() -> AsyncIterator[Pbx]:
    server = Pbx()
    task = asyncio.create_task(server.serve(), name="fake-pbx")
    yield server
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    server.sock.close()


@pytest.fixture
async def kamailio(tmp_path: Path, pbx: Pbx, phone: Phone) -> AsyncIterator[Started]:
    """Starts Kamailio with the doc's snippet pointed at ``url``; stops every one after."""
    started: list[Kamailio] = []

    async def start(url: str) -> Kamailio:
        proxy = Kamailio(
            tmp_path,
            {
                "OMNIROUTE_URL": url,
                "OMNIROUTE_TOKEN": API_TOKEN,
                "OMNIROUTE_FALLBACK": pbx.uri("reception"),
            },
        )
        started.append(proxy)
        proxy.start()
        await proxy.ready(phone)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@asynccontextmanager
async def omniroute(engine: AsyncEngine, pbx: Pbx, sink: Recorded) -> AsyncIterator[str]:
    """The real HTTP server with /v1/route on a loopback port, as the daemon wires it;
    yields the route's URL."""
    metrics = Metrics()
    routes = PbxRoutes(
        settings=ApiSettings(token=API_TOKEN, default_dial=pbx.uri("operator")),
        decider=DirectoryDecider(
            engine, RoutingSettings(default_region=REGION, default_team="t-triage")
        ),
        sink=sink,
        metrics=metrics,
        region=REGION,
    )
    settings = HttpSettings(host=LOCAL, port=0)
    app = build_app(
        health=Health(),
        metrics=metrics,
        http=settings,
        routers=[routes.router],
        fast_paths=[routes.fast_path],
    )
    server = HttpServer(app, settings, shutdown_timeout=2)
    stop = asyncio.Event()
    task = asyncio.create_task(server.run(stop), name="omniroute-http")
    try:
        async with asyncio.timeout(10):
            await server.started.wait()
        yield f"http://{LOCAL}:{server.port}/v1/route"
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def seed_sip_directory(engine: AsyncEngine, tmp_path: Path, pbx: Pbx) -> None:
    """tests/phone_fixtures' directory, with the SIP dials a Kamailio relays to, and a
    Belgian customer (issue 17: the one that reached reception)."""
    await seed_directory(engine, tmp_path)
    teams = tmp_path / "sip-teams.csv"
    teams.write_text(
        "id,name,dial,email\n"
        f"t-istanbul,Istanbul,{pbx.uri('istanbul')},istanbul@example.test\n"
        f"t-brussels,Brussels,{pbx.uri('brussels')},\n"
        f"t-triage,Triage,{pbx.uri('triage')},\n"
    )
    customers = tmp_path / "sip-customers.csv"
    customers.write_text("id,name,team,emails,phones,twitter\nc-bxl,Bxl,t-brussels,,+3221234567,\n")
    for path, kind in ((teams, "teams"), (customers, "customers")):
        report = await import_csv(engine, path, kind=kind, region=REGION, dry_run=False)
        assert not report.rejects, report.rejects


CALLERS = [  # (caller as the From user, Call-ID, where the call must go)
    ("05321112233", "kam-national@127.0.0.1", "istanbul"),
    ("+905321112233", "kam-e164@127.0.0.1", "istanbul"),
    ("+3221234567", "kam-foreign+1@127.0.0.1", "brussels"),
    ("+905559998877", "kam-unknown@127.0.0.1", "triage"),
    ("anonymous@anonymous.invalid", "kam-anonymous@127.0.0.1", "operator"),
]


async def test_kamailio_relays_each_caller_where_omniroute_says(
    engine: AsyncEngine, tmp_path: Path, pbx: Pbx, phone: Phone, kamailio: Started
) -> None:
    """The guide's snippet, pasted as it stands, sends national, E.164, foreign (``+32``,
    which ``{s.escape.param}`` turned into a space), unknown and withheld callers where the
    directory says, with the SIP Call-ID as the call's id."""
    await seed_sip_directory(engine, tmp_path, pbx)
    sink = Recorded()
    async with omniroute(engine, pbx, sink) as url:
        proxy = await kamailio(url)
        for caller, call_id, target in CALLERS:
            reply = await phone.invite(proxy.port, caller, call_id)
            assert (reply.status, reply.reason) == (486, f"{target} busy"), (
                caller,
                proxy.log_tail(),
            )
            assert pbx.invites[call_id] == [pbx.uri(target)], caller
        await until(lambda: len(sink.messages) == len(CALLERS), 5, "every call recorded")
    recorded = {m.external_id: m for m in sink.messages}
    assert set(recorded) == {call_id for _, call_id, _ in CALLERS}
    belgian = recorded["kam-foreign+1@127.0.0.1"]
    assert belgian.sender.address == "+3221234567"


async def test_kamailio_with_omniroute_hung_falls_back_once(
    tmp_path: Path, pbx: Pbx, phone: Phone, kamailio: Started
) -> None:
    """With omniroute accepting and never answering, the caller reaches the fallback after
    the doc's timeout, and the INVITE's resends start no queries of their own
    (``t_precheck_trans``): without it, each resend held another Kamailio process."""
    accepted: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await reader.read()  # until Kamailio gives up and closes

    hung = await asyncio.start_server(hang, LOCAL, 0)
    try:
        port = hung.sockets[0].getsockname()[1]
        proxy = await kamailio(f"http://{LOCAL}:{port}/v1/route")
        call_id = "kam-hung@127.0.0.1"
        reply = await phone.invite(proxy.port, "+3221234567", call_id)
        assert (reply.status, reply.reason) == (486, "reception busy"), proxy.log_tail()
        assert TIMEOUT - 0.5 < reply.elapsed < TIMEOUT + 1.0, reply
        assert reply.sent >= 3, "the caller resent its INVITE while omniroute hung"
        assert len(accepted) == 1, "one query for one call, however often it is resent"
        assert pbx.invites[call_id] == [pbx.uri("reception")]
    finally:
        for writer in accepted:
            writer.close()
        hung.close()
        await hung.wait_closed()
