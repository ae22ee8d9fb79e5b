"""Issue 16's done-when: two omniroute instances facing each other's acknowledgements do not
loop. Instance A polls folder A of a real Dovecot and sends by SMTP into folder B, which
instance B polls, and B's SMTP delivers into folder A: each is the other's customer. A
person at each side writes once; each side acknowledges once (``Auto-Submitted:
auto-replied``), and neither acknowledges the other's acknowledgement, so the mailboxes
hold two mails each and stay so."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import Envelope, Session
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.email.intake import EmailConnector
from connectors.email.smtp import SmtpSender
from connectors.settings import EmailSettings, MailboxSettings, SmtpSettings
from ingest.bus import Bus
from ingest.schema import RoutedMessage
from ingest.sink import BusSink
from ingest.topology import ROUTED_QUEUE
from routers import ack_text
from routers.acks import Acknowledger
from routers.decider import DirectoryDecider
from routers.models import Customer, CustomerIdentity, Team
from routers.settings import AckSettings, RoutingSettings
from routers.store.connector_state import DbCursorStore, DbSeenStore
from routers.store.engine import create_engine, migrate, sessionmaker
from tests.support.broker import fresh_vhost, opened_bus, take, vhost_url
from tests.support.mail import PASSWORD, USER, Dovecot, make_mail
from tests.support.net import free_port
from tests.workers import Workers


class IntoFolder:
    """An MTA that delivers what it accepts into a folder of the test Dovecot."""

    def __init__(self, dovecot: Dovecot, folder: str) -> None:
        self.dovecot, self.folder = dovecot, folder
        self.delivered = 0

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SmtpServer, session: Session, envelope: Envelope
    ) -> str:
        raw = envelope.original_content
        assert isinstance(raw, bytes)
        await asyncio.to_thread(self.dovecot.append, raw, self.folder)
        self.delivered += 1
        return "250 delivered"


@dataclass
class Side:
    """One omniroute instance: its address, the folder it polls, the folder it sends to."""

    name: str
    address: str
    polls: str
    peer_person: str
    peer_desk: str


def _count(dovecot: Dovecot, folder: str) -> int:
    client = dovecot.imap()
    try:
        typ, data = client.select(folder, readonly=True)
        assert typ == "OK", data
        return int(data[0] or 0)
    finally:
        client.logout()


@contextlib.asynccontextmanager
async def instance(
    side: Side, bus: Bus, tmp_path: Path, dovecot: Dovecot, delivers_to: str
) -> AsyncIterator[tuple[Workers, Acknowledger, IntoFolder]]:
    """Router, dispatcher and IMAP intake of one instance, with [ack] on, on its own vhost
    and SQLite directory, in which the other side's person and its support address are two
    customers: an acknowledgement from the other side would be a new conversation too."""
    url = f"sqlite:///{tmp_path}/{side.name}.db"
    await migrate(url)
    engine: AsyncEngine = create_engine(url)
    async with sessionmaker(engine).begin() as session:
        session.add(Team(id="desk", name=f"Desk {side.name}", dial=None, email=None))
        await session.flush()
        session.add(Customer(id="person", name="Person", team_id="desk"))
        session.add(Customer(id="desk", name="Their desk", team_id="desk"))
        await session.flush()
        session.add(CustomerIdentity(kind="email", address=side.peer_person, customer_id="person"))
        session.add(CustomerIdentity(kind="email", address=side.peer_desk, customer_id="desk"))
    mta = IntoFolder(dovecot, delivers_to)
    controller = Controller(mta, hostname="127.0.0.1", port=free_port())
    await asyncio.to_thread(controller.start)
    routing = RoutingSettings(default_region="TR")
    smtp = SmtpSettings(
        host="127.0.0.1",
        port=controller.port,
        security="none",
        from_address=side.address,
        timeout=5.0,
    )
    workers = Workers(bus, engine, SmtpSender(smtp, message_id_domain=f"{side.name}.test"), routing)
    acks = Acknowledger(
        bus=bus,
        engine=engine,
        directory=DirectoryDecider(engine, routing).directory,
        settings=AckSettings(),
        routing=routing,
        templates=ack_text.load(None),
    )
    workers.router.acks = acks
    box = MailboxSettings(
        name=side.name,
        host="127.0.0.1",
        port=dovecot.port,
        security="none",
        username=USER,
        password=SecretStr(PASSWORD),
        folder=side.polls,
        timeout=5.0,
        idle_renew=5.0,
        poll_interval=0.3,
        backoff_initial=0.05,
        backoff_max=0.3,
    )
    intake = EmailConnector(
        EmailSettings(mailboxes=[box], message_id_domain=f"{side.name}.test"),
        sink=BusSink(bus),
        cursors=DbCursorStore(engine),
        seen=DbSeenStore(engine),
        health=workers.health,
    )
    try:
        await workers.start(intake.run)
        yield workers, acks, mta
    finally:
        await workers.close()
        await asyncio.to_thread(controller.stop)
        await engine.dispose()


async def test_two_instances_do_not_acknowledge_each_others_acknowledgements(
    bus: Bus, dovecot: Dovecot, tmp_path: Path
) -> None:
    """Each side writes once: two mails in each folder (the person's and the other side's
    acknowledgement), and still two after a few seconds: bounded, no ping-pong."""
    a = Side(
        "a", "support@instance-a.test", "A", "person@instance-b.test", "support@instance-b.test"
    )
    b = Side(
        "b", "support@instance-b.test", "B", "person@instance-a.test", "support@instance-a.test"
    )
    client = dovecot.imap()
    try:
        for folder in ("A", "B"):
            client.create(folder)
    finally:
        client.logout()
    with fresh_vhost("omniroute-test-acks-b") as other:
        async with (
            opened_bus(vhost_url(other), name="instance-b") as bus_b,
            instance(a, bus, tmp_path, dovecot, delivers_to="B") as (side_a, acks_a, mta_a),
            instance(b, bus_b, tmp_path, dovecot, delivers_to="A") as (side_b, acks_b, mta_b),
        ):
            # a person at B writes to A's support, and a person at A to B's
            mails = [
                ("A", make_mail("p1@instance-b.test", sender="Person B <person@instance-b.test>")),
                ("B", make_mail("p2@instance-a.test", sender="Person A <person@instance-a.test>")),
            ]
            for folder, raw in mails:
                await asyncio.to_thread(dovecot.append, raw, folder)
            routed: dict[str, list[RoutedMessage]] = {}
            for name, workers in (("a", side_a), ("b", side_b)):
                taken = await take(workers.bus, ROUTED_QUEUE, 2, timeout=20)
                routed[name] = [t.model(RoutedMessage) for t in taken]
            for name in ("a", "b"):
                first, second = routed[name]
                assert not first.message.meta.get("auto_reply"), "the person's mail"
                assert second.message.meta.get("auto_reply") is True, "the other side's ack"
                assert second.message.meta.get("auto_reply_why") == "Auto-Submitted: auto-replied"
            await asyncio.sleep(3)  # time enough for a loop to show, many times over
            for workers in (side_a, side_b):
                await workers.router.idle()
                await workers.dispatcher.idle()
            assert (acks_a.published, acks_b.published) == (1, 1)
            assert (mta_a.delivered, mta_b.delivered) == (1, 1)
            assert await asyncio.to_thread(_count, dovecot, "A") == 2
            assert await asyncio.to_thread(_count, dovecot, "B") == 2
            more = await take(side_a.bus, ROUTED_QUEUE, quiet=0.3, timeout=5)
            assert more == []
