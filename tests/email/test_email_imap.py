"""The email channel against a real Dovecot, a real RabbitMQ and aiosmtpd."""

import asyncio
import email
import json
from collections.abc import Sequence
from email import policy
from email.message import EmailMessage

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.email.batch import cursor_key
from connectors.email.check import check
from connectors.email.imap import ImapSession
from connectors.email.intake import EmailConnector
from connectors.email.smtp import SmtpSender
from connectors.settings import EmailSettings, MailboxSettings, SmtpSettings
from ingest.bus import Bus
from ingest.errors import AuthError, ConfigError, PermanentSendError, TransientError
from ingest.health import Health
from ingest.protocols import ReplyContext
from ingest.schema import Identity, InboundMessage, ReplyRequest, Thread
from ingest.sink import BusSink
from routers.store.connector_state import DbCursorStore, DbSeenStore
from tests.support.broker import published
from tests.support.mail import PASSWORD, USER, Dovecot, SmtpSink, make_mail
from tests.support.net import TcpProxy, free_port
from tests.support.waiting import until


def mailbox(server: Dovecot, name: str = "support", **overrides: object) -> MailboxSettings:
    values: dict[str, object] = {
        "name": name,
        "host": "127.0.0.1",
        "port": server.port,
        "security": "none",
        "username": USER,
        "password": PASSWORD,
        "timeout": 5.0,
        "idle_renew": 5.0,
        "poll_interval": 0.5,
        "backoff_initial": 0.05,
        "backoff_max": 0.3,
        "team": "billing",
    }
    values.update(overrides)
    return MailboxSettings.model_validate(values)


def make_connector(
    engine: AsyncEngine, bus: Bus, *boxes: MailboxSettings, health: Health | None = None
) -> EmailConnector:
    return EmailConnector(
        EmailSettings(mailboxes=list(boxes)),
        sink=BusSink(bus),
        cursors=DbCursorStore(engine),
        seen=DbSeenStore(engine),
        health=health or Health(),
    )


class ProbeSink:
    """The real BusSink, plus a look at the mailbox's flags at the moment of each submit."""

    def __init__(self, bus: Bus, server: Dovecot, *, fail: bool = False) -> None:
        self.inner = BusSink(bus)
        self.server = server
        self.fail = fail
        self.flags_at_submit: list[dict[int, str]] = []

    async def submit(self, message: InboundMessage) -> None:
        self.flags_at_submit.append(await asyncio.to_thread(self.server.flags))
        if self.fail:
            raise TransientError("broker unreachable (test)")
        await self.inner.submit(message)

    async def submit_many(self, messages: Sequence[InboundMessage]) -> list[BaseException | None]:
        """Each message through ``submit`` (and a subclass's failures), all at once."""
        return list(await asyncio.gather(*map(self.submit, messages), return_exceptions=True))


async def test_appended_mail_is_published_then_flagged(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """The flag is the receipt: it must never be set before the broker confirmed."""
    dovecot.append(make_mail("first@customer.example"))
    probe = ProbeSink(email_bus, dovecot)
    connector = EmailConnector(
        EmailSettings(mailboxes=[mailbox(dovecot)]),
        sink=probe,
        cursors=DbCursorStore(engine),
        seen=DbSeenStore(engine),
        health=Health(),
    )
    assert await connector.drain() == 1

    assert "$Omniroute" not in probe.flags_at_submit[0][1]
    assert "\\Seen" not in probe.flags_at_submit[0][1]  # BODY.PEEK[] left it unread
    flags = dovecot.flags()
    assert "$Omniroute" in flags[1]
    assert "\\Seen" in flags[1]
    [message] = await published(email_bus)
    assert message.channel == "email"
    assert message.external_id == "first@customer.example"
    assert message.sender.address == "ayse@customer.example"
    assert message.sender.name == "Ayşe Yılmaz"
    assert message.subject == "Faturam hakkında"
    assert message.recipient is not None
    assert message.recipient.address == USER
    assert message.meta["address_team"] == "billing"


async def test_failed_publish_leaves_mail_unflagged_and_a_retry_takes_it(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """A broker failure must not lose the mail: not flagged, not remembered as seen."""
    dovecot.append(make_mail("retry@customer.example"))
    box = mailbox(dovecot)
    failing = EmailConnector(
        EmailSettings(mailboxes=[box]),
        sink=ProbeSink(email_bus, dovecot, fail=True),
        cursors=DbCursorStore(engine),
        seen=DbSeenStore(engine),
        health=Health(),
    )
    with pytest.raises(TransientError):
        await failing.drain()
    assert "$Omniroute" not in dovecot.flags()[1]

    assert await make_connector(engine, email_bus, box).drain() == 1
    assert [m.external_id for m in await published(email_bus)] == ["retry@customer.example"]
    assert "$Omniroute" in dovecot.flags()[1]


class FailOneSink(ProbeSink):
    """Fails the publish of one Message-ID, once; the others go to the broker."""

    def __init__(self, bus: Bus, server: Dovecot, failing: str) -> None:
        super().__init__(bus, server)
        self.failing: str | None = failing

    async def submit(self, message: InboundMessage) -> None:
        if message.external_id == self.failing:
            self.flags_at_submit.append(await asyncio.to_thread(self.server.flags))
            self.failing = None
            raise TransientError("broker refused this one (test)")
        await super().submit(message)


async def test_batch_with_one_failed_publish_flags_the_confirmed_and_retries_the_failed(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """Mails of a batch are published together: the confirmed ones are flagged, the failed
    one is forgotten, left unflagged and taken by the next pass, and nothing goes twice."""
    for n in range(5):
        dovecot.append(make_mail(f"b{n}@customer.example"))
    box = mailbox(dovecot, batch_size=5)
    sink = FailOneSink(email_bus, dovecot, "b2@customer.example")
    seen = DbSeenStore(engine)
    connector = EmailConnector(
        EmailSettings(mailboxes=[box]),
        sink=sink,
        cursors=DbCursorStore(engine),
        seen=seen,
        health=Health(),
    )
    with pytest.raises(TransientError, match="refused this one"):
        await connector.drain()

    assert all("$Omniroute" not in f for at in sink.flags_at_submit for f in at.values())
    flags = dovecot.flags()
    assert ["$Omniroute" in flags[uid] for uid in range(1, 6)] == [True, True, False, True, True]
    cursor = json.loads(await DbCursorStore(engine).get(cursor_key("support")) or "{}")
    assert cursor["last_uid"] == 2  # just before the failed mail
    ids = ["b1@customer.example", "b2@customer.example", "b3@customer.example"]
    assert await seen.first_time_many("email", ids) == {"b2@customer.example"}
    await seen.forget_many("email", ["b2@customer.example"])
    first = sorted(m.external_id for m in await published(email_bus))
    assert first == [f"b{n}@customer.example" for n in (0, 1, 3, 4)]

    assert await connector.drain() == 1
    assert [m.external_id for m in await published(email_bus)] == ["b2@customer.example"]
    assert all("$Omniroute" in f for f in dovecot.flags().values())
    cursor = json.loads(await DbCursorStore(engine).get(cursor_key("support")) or "{}")
    assert cursor["last_uid"] == 3  # 4 and 5 are flagged: no search names them again
    assert await connector.drain() == 0
    dovecot.append(make_mail("b5@customer.example"))
    assert await connector.drain() == 1
    assert [m.external_id for m in await published(email_bus)] == ["b5@customer.example"]


class SlowFailOneSink(FailOneSink):
    """Fails its one publish only after a while: the batch after it is confirmed first."""

    async def submit(self, message: InboundMessage) -> None:
        if message.external_id == self.failing:
            await asyncio.sleep(0.5)
        await super().submit(message)


async def test_a_failed_batch_amid_overlapping_batches_loses_nothing(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """Batches overlap (the next is fetched and recorded while one publishes, two settle
    at once): a publish failing in the second of five batches leaves the cursor before it,
    nothing after it flagged unless confirmed, and the next pass takes every mail not
    confirmed; copies only of mails of the batches settling beside the failed one."""
    for n in range(20):
        dovecot.append(make_mail(f"p{n:02d}@customer.example"))
    box = mailbox(dovecot, batch_size=4)
    sink = SlowFailOneSink(email_bus, dovecot, "p05@customer.example")
    connector = EmailConnector(
        EmailSettings(mailboxes=[box]),
        sink=sink,
        cursors=DbCursorStore(engine),
        seen=DbSeenStore(engine),
        health=Health(),
    )
    with pytest.raises(TransientError, match="refused this one"):
        await connector.drain()
    cursor = json.loads(await DbCursorStore(engine).get(cursor_key("support")) or "{}")
    assert cursor["last_uid"] == 5  # UID 6 is p05: the first batch and p04 are safe
    first = [m.external_id for m in await published(email_bus)]
    flags = dovecot.flags()
    assert "$Omniroute" not in flags[6]
    flagged = {f"p{uid - 1:02d}@customer.example" for uid, f in flags.items() if "$Omniroute" in f}
    assert flagged <= set(first)  # the flag is the receipt

    again = make_connector(engine, email_bus, box)
    await again.drain()
    second = [m.external_id for m in await published(email_bus)]
    everyone = {f"p{n:02d}@customer.example" for n in range(20)}
    assert set(first) | set(second) == everyone
    assert all("$Omniroute" in f for f in dovecot.flags().values())
    twice = set(first) & set(second)
    # a copy only of a mail confirmed in a batch settling beside the failed one (p08-p15)
    assert twice <= {f"p{n:02d}@customer.example" for n in range(8, 16)}, sorted(twice)
    assert len(second) == len(set(second))


async def test_restart_takes_nothing_twice(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """A daemon restart resumes from the stored cursor instead of re-reading the mailbox."""
    for n in range(3):
        dovecot.append(make_mail(f"m{n}@customer.example"))
    box = mailbox(dovecot, batch_size=2)
    assert await make_connector(engine, email_bus, box).drain() == 3

    again = make_connector(engine, email_bus, box)
    assert await again.drain() == 0
    dovecot.append(make_mail("m3@customer.example"))
    assert await again.drain() == 1

    ids = [m.external_id for m in await published(email_bus)]
    assert sorted(ids) == [f"m{n}@customer.example" for n in range(4)]
    cursor = json.loads(await DbCursorStore(engine).get(cursor_key("support")) or "{}")
    assert cursor["last_uid"] == 4


async def test_mail_read_in_webmail_first_is_still_taken(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """The cursor is the UID, not UNSEEN: a person opening the mail must not hide it."""
    dovecot.append(make_mail("read@customer.example"), flags="\\Seen")
    dovecot.append(make_mail("unread@customer.example"))
    dovecot.run(("uid", "STORE", "2", "+FLAGS", "(\\Seen)"))
    assert await make_connector(engine, email_bus, mailbox(dovecot)).drain() == 2
    assert len(await published(email_bus)) == 2


async def test_same_message_in_two_mailboxes_is_published_once(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """A mail sent to two support addresses is one customer message, not two tickets."""
    no_id = make_mail(None, subject="no Message-ID at all")
    for folder in ("INBOX", "Sales"):
        dovecot.append(make_mail("both@customer.example"), folder=folder)
        dovecot.append(no_id, folder=folder)
    connector = make_connector(
        engine, email_bus, mailbox(dovecot), mailbox(dovecot, name="sales", folder="Sales")
    )
    assert await connector.drain() == 2
    messages = await published(email_bus)
    assert len(messages) == 2
    assert {m.external_id for m in messages} >= {"both@customer.example"}
    assert all("$Omniroute" in f for f in dovecot.flags("Sales").values())


async def test_uidvalidity_change_rescans_by_keyword(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """A recreated folder renumbers UIDs; the keyword, not the old cursor, says what is new."""
    box = mailbox(dovecot, folder="Support")
    for n in range(3):
        dovecot.append(make_mail(f"old{n}@customer.example"), folder="Support")
    assert await make_connector(engine, email_bus, box).drain() == 3
    before = json.loads(await DbCursorStore(engine).get(cursor_key("support")) or "{}")
    await published(email_bus)

    client = dovecot.imap()
    try:
        assert client.delete("Support")[0] == "OK"
    finally:
        client.logout()
    dovecot.append(make_mail("restored-taken@customer.example"), "Support", "\\Seen $Omniroute")
    dovecot.append(make_mail("new@customer.example"), folder="Support")

    assert await make_connector(engine, email_bus, box).drain() == 1
    assert [m.external_id for m in await published(email_bus)] == ["new@customer.example"]
    after = json.loads(await DbCursorStore(engine).get(cursor_key("support")) or "{}")
    assert after["uidvalidity"] != before["uidvalidity"]
    assert after["last_uid"] == 2


async def test_mail_server_outage_marks_mailbox_down_then_recovers(
    dovecot: Dovecot, imap_proxy: TcpProxy, email_bus: Bus, engine: AsyncEngine
) -> None:
    """A mail server outage shows in /readyz and heals itself; mail sent after it arrives."""
    health = Health()
    box = mailbox(dovecot, port=imap_proxy.port)
    connector = make_connector(engine, email_bus, box, health=health)
    name = EmailConnector.component(box)
    stop = asyncio.Event()
    task = asyncio.create_task(connector.run(stop))
    try:
        await until(lambda: health.components[name].state == "up")
        dovecot.append(make_mail("while-idle@customer.example"))  # IDLE wakes the worker
        await until(lambda: "$Omniroute" in dovecot.flags().get(1, ""))

        await imap_proxy.cut()
        await until(lambda: health.components[name].state == "down")
        assert not health.ready()[0]
        dovecot.append(make_mail("during-outage@customer.example"))
        await imap_proxy.restore()
        await until(lambda: health.components[name].state == "up")
        dovecot.append(make_mail("after-outage@customer.example"))
        await until(lambda: "$Omniroute" in dovecot.flags().get(3, ""))
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task
    assert health.components[name].state == "stopped"
    ids = [m.external_id for m in await published(email_bus)]
    assert ids == [
        "while-idle@customer.example",
        "during-outage@customer.example",
        "after-outage@customer.example",
    ]


async def test_refused_login_stops_only_that_mailbox(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """A wrong password cannot heal by retrying; the other mailboxes keep working."""
    health = Health()
    good = mailbox(dovecot)
    bad = mailbox(dovecot, name="wrong", password="not-the-password")
    dovecot.append(make_mail("ok@customer.example"))
    stop = asyncio.Event()
    connector = make_connector(engine, email_bus, good, bad, health=health)
    task = asyncio.create_task(connector.run(stop))
    try:
        await until(lambda: health.components["email.wrong"].state == "down")
        await until(lambda: "$Omniroute" in dovecot.flags().get(1, ""))
        assert health.components["email.support"].state == "up"
        assert "login refused" in health.components["email.wrong"].reason
        assert PASSWORD not in health.components["email.wrong"].reason
    finally:
        stop.set()
        async with asyncio.timeout(10):
            await task


async def test_starttls_not_offered_is_an_error_and_no_login(dovecot: Dovecot) -> None:
    """STARTTLS is never opportunistic: no plaintext password goes to such a server."""
    box = mailbox(dovecot, security="starttls")
    with pytest.raises(ConfigError, match="STARTTLS"):
        await ImapSession.open(box)
    [(name, ok, why)] = await check(EmailSettings(mailboxes=[box]), None)
    assert (name, ok) == ("imap:support", False)
    assert "STARTTLS" in why
    assert "Login:" not in dovecot.log()
    assert "auth failed" not in dovecot.log().lower()


async def test_starttls_upgrade_then_login(
    dovecot_tls: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """With STARTTLS offered, the session upgrades, verifies the certificate and logs in."""
    dovecot_tls.append(make_mail("tls@customer.example"))
    box = mailbox(dovecot_tls, security="starttls", ca_file=str(dovecot_tls.cert))
    assert await make_connector(engine, email_bus, box).drain() == 1
    assert "Login: user=<support@example.com>, method=PLAIN" in dovecot_tls.log()
    assert ", TLS" in dovecot_tls.log()


async def test_check_reports_each_mailbox_and_smtp(dovecot: Dovecot, smtp_server: SmtpSink) -> None:
    """`omniroute check` names what fails and why, and what works."""
    results = await check(
        EmailSettings(mailboxes=[mailbox(dovecot), mailbox(dovecot, name="bad", password="x")]),
        SmtpSettings(
            host=smtp_server.host,
            port=smtp_server.port,
            security="none",
            from_address="support@omniroute.example",
        ),
    )
    verdicts = {name: ok for name, ok, _ in results}
    assert verdicts == {"imap:support": True, "imap:bad": False, "smtp": True}


# --- SMTP out -----------------------------------------------------------------------------


def smtp_settings(server: SmtpSink, **overrides: object) -> SmtpSettings:
    values: dict[str, object] = {
        "host": server.host,
        "port": server.port,
        "security": "none",
        "from_address": "support@omniroute.example",
        "timeout": 5.0,
    }
    values.update(overrides)
    return SmtpSettings.model_validate(values)


def received(server: SmtpSink, index: int) -> EmailMessage:
    raw = server.recorder.messages[index].original_content
    assert raw is not None
    mail = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(mail, EmailMessage)
    return mail


def reply_to(address: str = "ayse@customer.example") -> ReplyRequest:
    return ReplyRequest(
        id="r-1",
        channel="email",
        agent_id="agent-7",
        to=Identity(kind="email", address=address, name="Ayşe Yılmaz"),
        text="Merhaba, faturanızı düzelttik.",
    )


async def test_reply_is_threaded_under_the_customer_mail(smtp_server: SmtpSink) -> None:
    """The customer's next answer must name our Message-ID so it routes to thread_owner."""
    original = InboundMessage(
        channel="email",
        external_id="orig@customer.example",
        sender=Identity(kind="email", address="ayse@customer.example"),
        subject="RE: Re: Faturam hakkında",
        thread=Thread(
            message_id="orig@customer.example",
            in_reply_to="first@omniroute.example",
            references=["first@omniroute.example"],
        ),
    )
    sender = SmtpSender(smtp_settings(smtp_server), message_id_domain="mail.omniroute.example")
    result = await sender.send(reply_to(), ReplyContext(original=original))

    await until(lambda: len(smtp_server.recorder.messages) == 1, timeout=5)
    envelope = smtp_server.recorder.messages[0]
    assert envelope.rcpt_tos == ["ayse@customer.example"]
    mail = received(smtp_server, 0)
    assert mail["Subject"] == "Re: Faturam hakkında"
    assert mail["In-Reply-To"] == "<orig@customer.example>"
    assert mail["References"] == "<first@omniroute.example> <orig@customer.example>"
    assert mail["Message-ID"] == f"<{result.external_id}>"
    assert result.thread_message_id == result.external_id
    assert str(result.external_id).endswith("@mail.omniroute.example")
    assert "düzelttik" in mail.get_content()


async def test_reply_without_original_has_one_re_and_no_thread(smtp_server: SmtpSink) -> None:
    """A reply the dispatcher could not match still goes out, with a sane subject."""
    request = reply_to().model_copy(update={"subject": "Re: re: Sipariş"})
    result = await SmtpSender(smtp_settings(smtp_server)).send(request, ReplyContext())
    await until(lambda: len(smtp_server.recorder.messages) == 1, timeout=5)
    mail = received(smtp_server, 0)
    assert mail["Subject"] == "Re: Sipariş"
    assert mail["In-Reply-To"] is None
    assert mail["References"] is None
    assert str(result.external_id).endswith("@omniroute.example")


async def test_smtp_refusals_are_classified(smtp_server: SmtpSink) -> None:
    """5xx is final (reported as failed), 4xx and a dead server are retried."""
    sender = SmtpSender(smtp_settings(smtp_server))
    with pytest.raises(PermanentSendError):
        await sender.send(reply_to("refuse@customer.example"), ReplyContext())
    with pytest.raises(TransientError):
        await sender.send(reply_to("later@customer.example"), ReplyContext())
    with pytest.raises(TransientError):
        await SmtpSender(smtp_settings(smtp_server, port=free_port())).send(
            reply_to(), ReplyContext()
        )
    assert smtp_server.recorder.messages == []


async def test_smtp_starttls_required_but_not_offered(smtp_server: SmtpSink) -> None:
    """A server without STARTTLS gets no mail and no credentials when STARTTLS was asked."""
    sender = SmtpSender(
        smtp_settings(smtp_server, security="starttls", username="u", password="secret")
    )
    with pytest.raises(AuthError, match="STARTTLS"):
        await sender.send(reply_to(), ReplyContext())
    assert smtp_server.recorder.messages == []


async def test_sizes_are_read_before_bodies(dovecot: Dovecot) -> None:
    """Batches are cut by bytes as well as by count, so the sizes must be the server's."""
    raws = [make_mail("small@customer.example"), make_mail("big@customer.example") + b"x" * 5000]
    for raw in raws:
        dovecot.append(raw)
    session = await ImapSession.open(mailbox(dovecot))
    try:
        sizes = await session.sizes([1, 2])
    finally:
        await session.close()
    assert set(sizes) == {1, 2}
    assert sizes[2] - sizes[1] > 4900  # the padding, give or take line endings


async def test_reloaded_parse_limits_apply_to_the_next_mail(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """SIGHUP's new parse limits take the next mail (a new worker pool), no restart."""
    box = mailbox(dovecot)
    connector = make_connector(engine, email_bus, box)
    subject = " ".join(["=?utf-8?q?fatura?="] * 20)

    def mail(n: int) -> bytes:
        return (
            f"From: ayse@customer.example\r\nMessage-ID: <words-{n}@customer.example>\r\n"
            f"Subject: {subject}\r\n\r\nMerhaba\r\n"
        ).encode()

    dovecot.append(mail(1))
    assert await connector.drain() == 1
    await connector.reconcile(EmailSettings(mailboxes=[box], max_encoded_words=10))
    dovecot.append(mail(2))
    assert await connector.drain() == 1
    first, second = await published(email_bus)
    assert "unparsed" not in first.meta
    assert first.subject is not None
    assert first.subject.startswith("fatura")
    assert second.meta["unparsed_reason"] == "too_many_encoded_words"
    assert second.sender.address == "ayse@customer.example"
    assert second.subject is not None
    assert second.subject.startswith("fatura")


async def test_a_mail_past_max_message_bytes_is_never_held_whole(
    dovecot: Dovecot, email_bus: Bus, engine: AsyncEngine
) -> None:
    """A 3 MiB mail against a 1 MiB limit: only its head is fetched, and it is routed as
    a stand-in keeping its sender, Subject and Message-ID, the real size, and flagged."""
    box = mailbox(dovecot)
    connector = EmailConnector(
        EmailSettings(mailboxes=[box], max_message_bytes=1024 * 1024),
        sink=BusSink(email_bus),
        cursors=DbCursorStore(engine),
        seen=DbSeenStore(engine),
        health=Health(),
    )
    big = make_mail("big@customer.example", subject="Fatura ekte", text="x" * (3 * 1024 * 1024))
    dovecot.append(big)
    dovecot.append(make_mail("small@customer.example"))
    assert await connector.drain() == 2
    large, small = sorted(await published(email_bus), key=lambda m: m.external_id)
    assert large.external_id == "big@customer.example"
    assert large.meta["unparsed_reason"] == "too_large"
    assert large.sender.address == "ayse@customer.example"
    assert large.subject == "Fatura ekte"
    assert large.attachments[0].size == len(big.replace(b"\n", b"\r\n"))
    assert "unparsed" not in small.meta
    flags = await asyncio.to_thread(dovecot.flags)
    assert all("$Omniroute" in f for f in flags.values())
