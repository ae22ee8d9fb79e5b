"""The phone app the Twilio, PBX, HTTP and spool tests share (tests/conftest.py registers
these fixtures for every test): a seeded directory, the real app wired like the daemon does,
Twilio signatures computed with twilio's own validator, and a vhost per test module.
Everything listens on loopback only. The fake Twilio REST API is tests/twilio's."""

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from twilio.request_validator import RequestValidator

from config.channel_twilio import BusEvents
from connectors.http import build_app
from connectors.pbx.routes import PbxRoutes
from connectors.settings import ApiSettings, HttpSettings, SpoolSettings, TwilioSettings
from connectors.twilio import TwilioRoutes
from ingest.bus import Bus
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.protocols import Decider as DeciderProtocol
from ingest.settings import BusSettings
from ingest.sink import BusSink
from ingest.spool import SpooledSink
from ingest.topology import QUEUES
from routers.csv.importer import import_csv
from routers.decider import DirectoryDecider
from routers.settings import RoutingSettings
from routers.store.connector_state import DbSeenStore
from tests.support.broker import fresh_vhost, opened_bus, purge, vhost_url

BUS_SETTINGS = BusSettings(queue_type="quorum", delivery_limit=3, publish_timeout=3.0)

AUTH_TOKEN = "0123456789abcdef0123456789abcdef"
ACCOUNT_SID = "AC" + "0" * 32
PUBLIC_URL = "https://omniroute.example.test/hooks"
API_TOKEN = "pbx-route-token-for-tests"
REGION = "TR"
TEAM_DIAL = "+902125550100"
AGENT_DIAL = "client:ayse"
DEFAULT_DIAL = "+902125550199"
ACME_PHONE = "+905321112233"

TEAMS = """id,name,dial,email
t-istanbul,Istanbul,+902125550100,istanbul@example.test
t-sip,SIP desk,sip:desk@pbx.example.test,
t-queue,Queue desk,queue:support,
t-triage,Triage,+902125550199,
"""
AGENTS = """id,name,team,email,phone,dial,active
a-ayse,Ayse,t-istanbul,ayse@example.test,,client:ayse,true
"""
CUSTOMERS = """id,name,team,emails,phones,twitter
c-acme,Acme,t-istanbul,ops@acme.test,+905321112233,
c-sipco,SipCo,t-sip,,+905321112244,
c-queue,QueueCo,t-queue,,+905321112255,
"""


async def seed_directory(engine: AsyncEngine, tmp_path: Path) -> None:
    """Load the directory through the real CSV importer."""
    for kind, text in (("teams", TEAMS), ("agents", AGENTS), ("customers", CUSTOMERS)):
        path = tmp_path / f"{kind}.csv"
        path.write_text(text)
        report = await import_csv(engine, path, kind=kind, region=REGION, dry_run=False)
        assert not report.rejects, report.rejects


def signature(url: str, params: dict[str, str]) -> str:
    return str(RequestValidator(AUTH_TOKEN).compute_signature(url, params))


@dataclass
class Phones:
    """The app as the daemon wires it, and the handles tests look at."""

    app: Any
    client: httpx.AsyncClient
    bus: Bus
    metrics: Metrics
    health: Health
    spool: SpooledSink
    engine: AsyncEngine
    extra: dict[str, Any] = field(default_factory=dict)

    async def twilio(
        self, path: str, params: dict[str, str], *, query: str = "", signed: bool = True
    ) -> httpx.Response:
        """POST a form to a Twilio webhook, signed as Twilio signs it."""
        url = f"{PUBLIC_URL}{path}" + (f"?{query}" if query else "")
        headers = {"X-Twilio-Signature": signature(url, params)} if signed else {}
        return await self.client.post(
            path + (f"?{query}" if query else ""), data=params, headers=headers
        )

    async def route(self, **params: str) -> httpx.Response:
        return await self.client.get(
            "/v1/route?" + urlencode(params), headers={"Authorization": f"Bearer {API_TOKEN}"}
        )


AppFactory = Callable[..., Awaitable[Phones]]


@pytest.fixture(scope="module")
def phone_vhost() -> Iterator[str]:
    """One vhost per test module (creating one costs seconds); ``phone_bus`` empties its
    queues before each test, so tests still start from an empty broker."""
    with fresh_vhost("omniroute-phones") as name:
        yield name


@pytest.fixture
def phone_amqp_url(phone_vhost: str) -> str:
    return vhost_url(phone_vhost)


@pytest.fixture
async def phone_bus(phone_amqp_url: str) -> AsyncIterator[Bus]:
    """An opened bus on the module's vhost, every queue purged."""
    async with opened_bus(phone_amqp_url, settings=BUS_SETTINGS, name="phones-test") as bus:
        await purge(bus, *QUEUES)
        yield bus


def webhook_app(
    *,
    twilio: TwilioSettings,
    http: HttpSettings,
    spool: SpooledSink,
    seen: DbSeenStore,
    decider: DeciderProtocol,
    bus: Bus,
    metrics: Metrics,
    health: Health,
) -> Any:
    """The HTTP app with the Twilio webhooks and /v1/route, wired as the daemon does."""
    pbx = PbxRoutes(
        settings=ApiSettings(token=API_TOKEN, default_dial=DEFAULT_DIAL),
        decider=decider,
        sink=spool,
        metrics=metrics,
        region=REGION,
    )
    routers = [
        TwilioRoutes(
            settings=twilio,
            http=http,
            sink=spool,
            seen=seen,
            decider=decider,
            events=BusEvents(bus),
            metrics=metrics,
            region=REGION,
        ).router,
        pbx.router,
    ]
    return build_app(
        health=health,
        metrics=metrics,
        http=http,
        routers=routers,
        fast_paths=[pbx.fast_path],
        spool=spool,
    )


@pytest.fixture
async def make_phones(
    engine: AsyncEngine, phone_bus: Bus, tmp_path: Path
) -> AsyncIterator[AppFactory]:
    """Builds the real app over the real broker, directory and spool."""
    bus = phone_bus
    await seed_directory(engine, tmp_path)
    clients: list[httpx.AsyncClient] = []

    async def make(
        *,
        routing: RoutingSettings | None = None,
        sink_bus: Bus | None = None,
        spool_settings: SpoolSettings | None = None,
        twilio: TwilioSettings | None = None,
        decider: DeciderProtocol | None = None,
    ) -> Phones:
        metrics = Metrics()
        health = Health()
        routing = routing or RoutingSettings(default_region=REGION, default_team="t-triage")
        decide = decider or DirectoryDecider(engine, routing)
        seen = DbSeenStore(engine)
        spool = SpooledSink(
            BusSink(sink_bus or bus),
            tmp_path / f"spool-{len(clients)}",
            spool_settings or SpoolSettings(publish_timeout=3.0),
            metrics,
        )
        http = HttpSettings(public_url=PUBLIC_URL, port=0)
        twilio_settings = twilio or TwilioSettings(
            account_sid=ACCOUNT_SID,
            auth_token=AUTH_TOKEN,
            from_number="+902125550000",
            dial_timeout=25,
            default_dial=DEFAULT_DIAL,
        )
        app = webhook_app(
            twilio=twilio_settings,
            http=http,
            spool=spool,
            seen=seen,
            decider=decide,
            bus=bus,
            metrics=metrics,
            health=health,
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        clients.append(client)
        return Phones(app, client, bus, metrics, health, spool, engine)

    yield make
    for client in clients:
        await client.aclose()


def call(sid: str, caller: str = ACME_PHONE, **extra: str) -> dict[str, str]:
    return {
        "CallSid": sid,
        "AccountSid": ACCOUNT_SID,
        "From": caller,
        "To": "+902125550000",
        "CallStatus": "ringing",
        "Direction": "inbound",
        **extra,
    }


def parse_twiml(text: str) -> ElementTree.Element:
    return ElementTree.fromstring(text)  # noqa: S314 -- our own app's answer, not untrusted


def dial_of(twiml: str) -> tuple[ElementTree.Element, list[tuple[str, str]]]:
    root = parse_twiml(twiml)
    dial = root.find("Dial")
    assert dial is not None, twiml
    return dial, [(child.tag, (child.text or "").strip()) for child in dial]
