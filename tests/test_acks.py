"""Issue 16, acknowledgements: the first message of a new conversation gets one short answer
on its own channel, in the customer's language, and nothing else changes. The real router
(with its ``Acknowledger``), the real outbound dispatcher with the SMTP sender (aiosmtpd)
and the Twilio senders (the fake Twilio REST API), on the real broker and directory."""

import asyncio
import email
from collections.abc import AsyncIterator
from datetime import timedelta
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import SecretStr
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from config.components import Wiring
from config.settings import Settings
from connectors.email.smtp import SmtpSender
from connectors.settings import HttpSettings, SmtpSettings, TwilioSettings
from connectors.twilio import TwilioSmsSender, TwilioWhatsAppSender
from ingest.bus import Bus
from ingest.errors import ConfigError
from ingest.health import Health
from ingest.metrics import Metrics
from ingest.schema import (
    CustomerRef,
    Identity,
    InboundMessage,
    ReplyRequest,
    Route,
    RoutedMessage,
    Thread,
    utcnow,
)
from ingest.settings import BusSettings
from ingest.topology import INBOUND, OUTBOUND_QUEUE
from routers import ack_text
from routers.acks import ACK_AGENT, ACK_HEADER, Acknowledger
from routers.decider import DirectoryDecider
from routers.dispatcher import OutboundDispatcher
from routers.models import (
    AckSent,
    Assignment,
    Customer,
    CustomerIdentity,
    LastAgent,
    SentReply,
    Team,
    ThreadOwner,
)
from routers.settings import AckSettings, DispatchSettings, RouterSettings, RoutingSettings
from routers.store.engine import create_engine, migrate, sessionmaker
from routers.worker import RouterWorker
from tests.email.conftest import smtp_server as smtp_server
from tests.phone_fixtures import ACCOUNT_SID, AUTH_TOKEN, PUBLIC_URL
from tests.seed import seed
from tests.support.broker import take
from tests.support.mail import SmtpSink
from tests.twilio.fake_api import FakeTwilioApi

SMS_FROM = "+905550000000"
DAYS_TR = ("Pazartesi", "Salı", "Çarşamba", "Perşembe", "Cuma", "Cumartesi", "Pazar")
DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class Desk:
    """A router with acknowledgements and a dispatcher with email, SMS and WhatsApp senders."""

    def __init__(
        self,
        bus: Bus,
        engine: AsyncEngine,
        smtp: SmtpSink,
        twilio: FakeTwilioApi,
        *,
        ack: AckSettings | None = None,
        routing: RoutingSettings | None = None,
        null_sender: bool = False,
    ) -> None:
        routing = routing or RoutingSettings(default_region="TR")
        self.bus = bus
        self.health = Health()
        self.metrics = Metrics()
        decider = DirectoryDecider(engine, routing)
        self.router = RouterWorker(
            bus=bus,
            engine=engine,
            decider=decider,
            routing=routing,
            settings=RouterSettings(prefetch=16),
            health=self.health,
            metrics=self.metrics,
        )
        self.acks = Acknowledger(
            bus=bus,
            engine=engine,
            directory=decider.directory,
            settings=ack or AckSettings(),
            routing=routing,
            templates=ack_text.load(None),
            metrics=self.metrics,
        )
        self.router.acks = self.acks
        sms = TwilioSettings(
            account_sid=ACCOUNT_SID,
            auth_token=SecretStr(AUTH_TOKEN),
            from_number=SMS_FROM,
            api_base_url=twilio.url,
            send_timeout=5,
        )
        http = HttpSettings(public_url=PUBLIC_URL)
        smtp_settings = SmtpSettings(
            host=smtp.host,
            port=smtp.port,
            security="none",
            from_address="support@example.com",
            auto_reply_null_sender=null_sender,
        )
        self.twilio = [
            TwilioSmsSender(sms, http, region="TR"),
            TwilioWhatsAppSender(sms, http, region="TR"),
        ]
        self.dispatcher = OutboundDispatcher(
            bus=bus,
            engine=engine,
            senders={
                "email": SmtpSender(smtp_settings, message_id_domain="omniroute.test"),
                **{sender.channel: sender for sender in self.twilio},
            },
            routing=routing,
            settings=DispatchSettings(attempts=2, base_delay=0.05),
            health=self.health,
        )
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.tasks = [
            asyncio.create_task(self.router.run(self.stop, drain_timeout=5)),
            asyncio.create_task(self.dispatcher.run(self.stop, drain_timeout=5)),
        ]
        await self.router.idle()
        await self.dispatcher.idle()

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*self.tasks)
        for sender in self.twilio:
            await sender.close()

    async def send(self, message: InboundMessage) -> InboundMessage:
        """Publish as an intake does; return once routed and every reply request sent."""
        await self.bus.publish(INBOUND, message.channel, message, message_id=message.id)
        await self.router.idle()
        await self.dispatcher.idle()
        return message

    def counted(self, channel: str, result: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "omniroute_acks_total", {"channel": channel, "result": result}
        )
        return value or 0.0


def mail(sender: str = "ayse@acme.test", name: str | None = "Ayşe", **meta: Any) -> InboundMessage:
    external = f"<{utcnow().timestamp()}-{id(meta)}@acme.test>"
    return InboundMessage(
        channel="email",
        external_id=external,
        sender=Identity(kind="email", address=sender, name=name),
        recipient=Identity(kind="email", address="support@example.com"),
        subject="Faturam",
        text="Faturam nerede?",
        thread=Thread(message_id=external.strip("<>")),
        meta=meta,
    )


def text_message(
    channel: str = "sms", sender: str = "+905321112233", **meta: Any
) -> InboundMessage:
    return InboundMessage(
        channel=channel,  # type: ignore[arg-type]
        external_id=f"SM{utcnow().timestamp()}{id(meta)}",
        sender=Identity(kind="phone", address=sender),
        recipient=Identity(kind="phone", address=SMS_FROM),
        text="hâlâ bekliyorum",
        meta=meta,
    )


def received(smtp: SmtpSink) -> list[EmailMessage]:
    out = []
    for envelope in smtp.recorder.messages:
        raw = envelope.original_content
        assert isinstance(raw, bytes)
        parsed = email.message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        out.append(parsed)
    return out


@pytest.fixture
async def twilio() -> AsyncIterator[FakeTwilioApi]:
    api = FakeTwilioApi()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def desk(
    bus: Bus, db: AsyncEngine, smtp_server: SmtpSink, twilio: FakeTwilioApi
) -> AsyncIterator[Desk]:
    """Acme (billing) writes in; on SQLite and on PostgreSQL."""
    await seed(db)
    d = Desk(bus, db, smtp_server, twilio)
    await d.start()
    yield d
    await d.close()


async def test_the_first_mail_is_acknowledged_once_across_channels(
    desk: Desk, smtp_server: SmtpSink, twilio: FakeTwilioApi, db: AsyncEngine
) -> None:
    """The issue's done-when: one ack, threaded and marked automatic; the next mail and an
    SMS of the same customer within ack.quiet_for get none."""
    first = await desk.send(mail())
    [ack] = received(smtp_server)
    assert ack["Auto-Submitted"] == "auto-replied"
    assert ack["In-Reply-To"] == f"<{first.thread.message_id}>"  # type: ignore[union-attr]
    assert ack["Subject"] == "Re: Faturam"
    assert ack["To"].addresses[0].addr_spec == "ayse@acme.test"
    body = ack.get_content()
    assert "Hello Acme Ltd," in body
    assert "Billing" in body
    assert first.id.replace("-", "")[:8].upper() in body  # {reference}
    await desk.send(mail())
    await desk.send(text_message())
    assert len(smtp_server.recorder.messages) == 1
    assert twilio.requests == []
    assert desk.counted("email", "published") == 1
    async with sessionmaker(db)() as session:
        assert await session.get(AckSent, "customer:acme") is not None
        sent = await session.get(SentReply, f"ack:{first.id}")
        assert sent is not None
        assert sent.channel == "email"


async def test_a_turkish_customer_of_a_closed_team_is_told_when_it_opens_in_turkish(
    desk: Desk, twilio: FakeTwilioApi, db: AsyncEngine
) -> None:
    """customers.csv language tr: the Turkish template, and {opens_at} with a Turkish day."""
    istanbul = ZoneInfo("Europe/Istanbul")
    opens = (utcnow().astimezone(istanbul) + timedelta(days=2)).weekday()
    async with sessionmaker(db).begin() as session:
        await session.execute(update(Customer).where(Customer.id == "acme").values(language="tr"))
        await session.execute(
            update(Team)
            .where(Team.id == "billing")
            .values(timezone="Europe/Istanbul", hours=f"{DAYS[opens]} 09:00-17:00")
        )
    message = await desk.send(text_message())
    [request] = twilio.requests
    assert request["To"] == "+905321112233"
    body = request["Body"]
    assert body.startswith("Merhaba Acme Ltd, mesajınızı aldık"), body
    assert f"{DAYS_TR[opens]} 09:00 itibarıyla" in body, body
    assert message.id.replace("-", "")[:8].upper() in body


async def test_nobody_automatic_unproven_or_unknown_is_acknowledged(
    bus: Bus, engine: AsyncEngine, smtp_server: SmtpSink, twilio: FakeTwilioApi
) -> None:
    """Never to a bounce, an auto-reply, a no-reply address, an unverified sender, a public
    X mention or a stranger; a stranger only with ack.unknown_senders. Each case is a
    customer of its own, so that none is silenced by another's conversation."""
    await seed(engine)
    async with sessionmaker(engine).begin() as session:
        for n, address in enumerate(
            ["bounce@c.test", "auto@c.test", "noreply@c.test", "no-reply@d.test",
             "mailer-daemon@c.test", "unproven@c.test", "fine@c.test"]
        ):  # fmt: skip
            session.add(Customer(id=f"c{n}", name=f"C{n}", team_id="billing"))
            await session.flush()
            session.add(CustomerIdentity(kind="email", address=address, customer_id=f"c{n}"))
    routing = RoutingSettings(default_region="TR", require_authenticated_email=True)
    desk = Desk(bus, engine, smtp_server, twilio, routing=routing)
    await desk.start()
    proven = {"auth": {"authserv_id": "mx.test", "dmarc": "pass"}}
    try:
        for message in [
            mail("bounce@c.test", bounce=True, bounce_why="X-Failed-Recipients", **proven),
            mail("auto@c.test", auto_reply=True, auto_reply_why="Auto-Submitted", **proven),
            mail("noreply@c.test", **proven),
            mail("no-reply@d.test", **proven),
            mail("mailer-daemon@c.test", **proven),
            mail("unproven@c.test", auth={"authserv_id": "mx.test", "dmarc": "fail"}),
            mail("stranger@nowhere.test", **proven),
            InboundMessage(
                channel="twitter",
                external_id="1790000000000000001",
                sender=Identity(kind="twitter", address="acmeltd"),
                text="@acme where is my invoice",
                meta={"kind": "mention"},
            ),
        ]:
            await desk.send(message)
        assert desk.acks.published == 0
        assert smtp_server.recorder.messages == []
        await desk.send(mail("fine@c.test", **proven))  # the desk does acknowledge
        assert desk.acks.published == 1
        desk.acks.settings = AckSettings(unknown_senders=True)
        await desk.send(mail("stranger2@nowhere.test", **proven))
        await desk.send(mail("stranger2@nowhere.test", **proven))
        assert desk.acks.published == 2, "a stranger once, keyed by the address"
        assert len(smtp_server.recorder.messages) == 2
    finally:
        await desk.close()


async def test_an_acknowledgement_is_nobodys_answer(
    bus: Bus, engine: AsyncEngine, smtp_server: SmtpSink, twilio: FakeTwilioApi
) -> None:
    """The ack leaves the last agent, the offer and the thread as they were: it must not
    make omniroute believe the customer was answered."""
    await seed(engine)
    before = utcnow() - timedelta(days=1)
    async with sessionmaker(engine).begin() as session:
        session.add(LastAgent(customer_id="acme", agent_id="ana", channel="email", at=before))
    routing = RoutingSettings(default_region="TR", offer_timeout={"email": timedelta(minutes=5)})
    desk = Desk(bus, engine, smtp_server, twilio, routing=routing)
    await desk.start()
    try:
        message = await desk.send(mail())
        [ack] = received(smtp_server)
    finally:
        await desk.close()
    ack_id = str(ack["Message-ID"]).strip("<>")
    async with sessionmaker(engine)() as session:
        last = await session.get(LastAgent, "acme")
        assert last is not None
        assert (last.agent_id, last.at.replace(tzinfo=None)) == (
            "ana",
            before.replace(tzinfo=None),
        )
        offer = await session.get(Assignment, message.id)
        assert offer is not None
        assert offer.agent_id == "ana"
        assert offer.closed_at is None, "still open"
        assert offer.offer_due_at is not None, "still an offer with its timer"
        assert await session.get(ThreadOwner, ack_id) is None
        owners = (await session.execute(select(ThreadOwner))).scalars().all()
        assert owners == []


async def test_a_failing_acknowledgement_never_holds_the_routed_message(
    desk: Desk, db: AsyncEngine, smtp_server: SmtpSink
) -> None:
    """The ledger gone (a database fault): the message is routed and acked to the broker
    as always; the failure is a warning and a count, and the next batch goes on."""
    async with db.begin() as connection:
        await connection.execute(text("DROP TABLE acks"))
    message = await desk.send(mail())
    [routed] = await take(desk.bus, "omniroute.routed", 1, timeout=5)
    assert routed.message_id == message.id
    assert desk.router.routed == 1
    assert desk.counted("email", "failed") == 1
    assert smtp_server.recorder.messages == []


async def test_two_routers_on_one_postgresql_send_one_acknowledgement(
    bus: Bus, pg_url: str
) -> None:
    """Two instances claiming the same customer at the same moment: the conditional upsert
    lets one through, every time."""
    await migrate(pg_url)
    engines = [create_engine(pg_url), create_engine(pg_url)]
    try:
        await seed(engines[0])
        routing = RoutingSettings(default_region="TR")
        templates = ack_text.load(None)
        acks = [
            Acknowledger(
                bus=bus,
                engine=engine,
                directory=DirectoryDecider(engine, routing).directory,
                settings=AckSettings(),
                routing=routing,
                templates=templates,
            )
            for engine in engines
        ]
        customer = CustomerRef(id="acme", name="Acme Ltd", team="billing")
        rounds = 12
        for _ in range(rounds):
            async with sessionmaker(engines[0]).begin() as session:
                await session.execute(delete(AckSent))
            batches = [
                [RoutedMessage(message=m, customer=customer, route=_team_route())]
                for m in (mail(), text_message())
            ]
            await asyncio.gather(*(a.acknowledge(b) for a, b in zip(acks, batches, strict=True)))
        assert sum(a.published for a in acks) == rounds
        requests = await take(bus, OUTBOUND_QUEUE, rounds, timeout=10)
        assert {r.headers.get(ACK_HEADER) for r in requests} == {1}
        assert {r.user_id for r in requests} == {bus.user}
        replies = [r.model(ReplyRequest) for r in requests]
        assert {r.agent_id for r in replies} == {ACK_AGENT}
        assert all(r.id == f"ack:{r.in_reply_to}" for r in replies)
        assert await take(bus, OUTBOUND_QUEUE, quiet=0.2, timeout=5) == []
    finally:
        for engine in engines:
            await engine.dispose()


def _team_route() -> Route:
    return Route(kind="team", target="billing", reason="dedicated_team")


def test_an_operators_templates_are_checked_and_used_first(tmp_path: Path) -> None:
    """ack.templates overrides the shipped ones; an unknown placeholder is one line."""
    (tmp_path / "sms.tr.txt").write_text("Selam {customer_name}! Ref {reference}\n")
    (tmp_path / "email.de.txt").write_text("Hallo {customer_name}\n")
    templates = ack_text.load(tmp_path)
    words = ack_text.Words("Ayşe", None, "AB12CD34", None)
    assert (
        templates.render("sms", "tr", words, utcnow(), fallback="en") == "Selam Ayşe! Ref AB12CD34"
    )
    assert templates.render("whatsapp", "tr", words, utcnow(), fallback="en").startswith(
        "Merhaba Ayşe,"
    )
    assert templates.render("email", "de", words, utcnow(), fallback="en") == "Hallo Ayşe"
    german_sms = templates.render("sms", "de", words, utcnow(), fallback="en")
    assert german_sms.startswith("Hello Ayşe,"), "no German SMS template: the default language"
    (tmp_path / "en.txt").write_text("Hi {customer}\n")
    with pytest.raises(ConfigError) as caught:
        ack_text.load(tmp_path)
    assert str(caught.value).startswith("ack.templates: en.txt: unknown placeholder {customer}")
    assert "\n" not in str(caught.value)
    (tmp_path / "en.txt").write_text("Hi, we open {opens_at}\n")
    with pytest.raises(ConfigError, match=r"only in \.closed templates"):
        ack_text.load(tmp_path)
    (tmp_path / "en.txt").write_text("Hi {customer_name\n")
    with pytest.raises(ConfigError, match="en.txt"):
        ack_text.load(tmp_path)


def test_the_wiring_refuses_a_bad_template_and_a_second_sms_answer(tmp_path: Path) -> None:
    """A bad template stops the start (and `omniroute check`); twilio.sms_ack_text beside
    [ack] on SMS would answer a first SMS twice, so the two are refused together."""
    (tmp_path / "tr.txt").write_text("Merhaba {isim}\n")
    bus = Bus("amqp://guest:guest@127.0.0.1:5672/", BusSettings())
    engine = create_engine(f"sqlite:///{tmp_path}/d.db")
    wrong = [
        Settings(ack=AckSettings(templates=tmp_path)),
        Settings(ack=AckSettings(), twilio=TwilioSettings(sms_ack_text="Aldık")),
    ]
    for settings, expected in zip(
        wrong, ["tr.txt: unknown placeholder", "sms_ack_text"], strict=True
    ):
        with pytest.raises(ConfigError, match=expected):
            Wiring(settings, Health(), bus, engine, Metrics())
    # email-only acknowledgements leave SMS to sms_ack_text
    settings = Settings(
        ack=AckSettings(channels=["email"]), twilio=TwilioSettings(sms_ack_text="Aldık")
    )
    assert Wiring(settings, Health(), bus, engine, Metrics()).ack_templates is not None


async def test_a_strangers_own_display_name_is_not_echoed_back(
    bus: Bus, engine: AsyncEngine, smtp_server: SmtpSink, twilio: FakeTwilioApi
) -> None:
    """With ack.unknown_senders, anyone who writes in gets a mail from the company's own
    address: the name a stranger put in their From (which can be any text, and any address
    when mail is not authenticated) must not be written into it; the stand-in is."""
    await seed(engine)
    desk = Desk(bus, engine, smtp_server, twilio)
    await desk.start()
    try:
        desk.acks.settings = AckSettings(unknown_senders=True)
        lure = "Your account is locked, log in at http://evil.test/unlock"
        await desk.send(mail("victim@nowhere.test", name=lure))
        [ack] = received(smtp_server)
        body = ack.get_content()
        assert "evil.test" not in body
        assert body.startswith("Hello there,")
    finally:
        await desk.close()
