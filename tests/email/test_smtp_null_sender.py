"""``smtp.auto_reply_null_sender``: an acknowledgement goes out with the null envelope sender
``MAIL FROM:<>`` (RFC 3834 section 3.3), so a bounce of it goes nowhere and cannot start a
loop; an agent's reply never does. A server that refuses the null sender fails the
acknowledgement for good, naming the setting. Against aiosmtpd on loopback, through the
SMTP sender alone and through the real router and dispatcher."""

from collections.abc import AsyncIterator

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SmtpServer
from aiosmtpd.smtp import Envelope, Session
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.email.smtp import SmtpSender
from ingest.bus import Bus
from ingest.errors import PermanentSendError
from ingest.protocols import ReplyContext
from ingest.schema import Identity, ReplyRequest
from ingest.topology import EVENTS_QUEUE, OUTBOUND
from tests.email.test_email_imap import received, reply_to, smtp_settings
from tests.seed import seed
from tests.support.broker import take
from tests.support.mail import Recorder, SmtpSink, serving_smtp
from tests.support.waiting import until
from tests.test_acks import Desk, mail
from tests.test_acks import received as received_mails
from tests.test_acks import twilio as twilio
from tests.twilio.fake_api import FakeTwilioApi

FROM = "support@omniroute.example"
REFUSAL = "550 5.7.1 Null sender not accepted from authenticated clients"


class Submission(Recorder):
    """The recorder that also keeps each MAIL command as it came over the wire and, given
    ``null_reply``, answers ``MAIL FROM:<>`` with it (as Office 365 or Gmail would)."""

    def __init__(self, null_reply: str | None = None, *, at_data: bool = False) -> None:
        super().__init__()
        self.null_reply = null_reply
        self.at_data = at_data  # take MAIL FROM:<>, refuse its mail after DATA instead
        self.mail_commands: list[str] = []

    async def handle_MAIL(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SmtpServer, session: Session, envelope: Envelope, address: str,
        mail_options: list[str],
    ) -> str:  # fmt: skip
        if address == "<>" and self.null_reply is not None and not self.at_data:
            return self.null_reply  # "<>": aiosmtpd's name for the null path
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_DATA(  # noqa: N802 (aiosmtpd's hook name)
        self, server: SmtpServer, session: Session, envelope: Envelope
    ) -> str:
        if envelope.mail_from == "<>" and self.null_reply is not None:
            return self.null_reply
        return await super().handle_DATA(server, session, envelope)


class WireSmtp(SmtpServer):  # type: ignore[misc]
    """aiosmtpd's server, keeping the MAIL command line before parsing it."""

    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802 (aiosmtpd's name)
        self.event_handler.mail_commands.append(f"MAIL {arg}")
        await super().smtp_MAIL(arg)


class WireController(Controller):  # type: ignore[misc]
    def factory(self) -> WireSmtp:
        return WireSmtp(self.handler, **self.SMTP_kwargs)


async def _serve(handler: Submission) -> AsyncIterator[SmtpSink]:
    async with serving_smtp(handler, WireController) as sink:
        yield sink


@pytest.fixture
async def submission() -> AsyncIterator[SmtpSink]:
    """An SMTP server that takes the null sender and records the MAIL lines."""
    async for sink in _serve(Submission()):
        yield sink


@pytest.fixture
async def refusing() -> AsyncIterator[SmtpSink]:
    """An SMTP server that refuses ``MAIL FROM:<>`` with 550 and takes any other sender."""
    async for sink in _serve(Submission(null_reply=REFUSAL)):
        yield sink


def mail_commands(server: SmtpSink) -> list[str]:
    assert isinstance(server.recorder, Submission)
    return server.recorder.mail_commands


def envelope_sender(command: str) -> str:
    """The reverse-path of a MAIL command, after checking that only ESMTP parameters (such
    as aiosmtplib's BODY=8BITMIME) follow it."""
    path, *parameters = command.removeprefix("MAIL ").split(" ")
    assert all("=" in p for p in parameters), command
    return path


ACK = ReplyContext(auto_reply=True)


async def test_with_the_setting_on_an_acknowledgement_has_the_null_envelope_sender(
    submission: SmtpSink,
) -> None:
    """RFC 3834 3.3: a bounce of an automatic reply must go nowhere; the From a customer
    sees is unchanged, and an agent's reply keeps its return path."""
    sender = SmtpSender(smtp_settings(submission, auto_reply_null_sender=True))
    await sender.send(reply_to(), ACK)
    await sender.send(reply_to().model_copy(update={"id": "r-2"}), ReplyContext())

    await until(lambda: len(submission.recorder.messages) == 2, timeout=5)
    ack_command, agent_command = mail_commands(submission)
    assert envelope_sender(ack_command) == "FROM:<>", "exactly MAIL FROM:<>"
    assert envelope_sender(agent_command) == f"FROM:<{FROM}>"
    ack, agent = submission.recorder.messages
    assert ack.mail_from == "<>"  # aiosmtpd's spelling of the null reverse-path
    assert agent.mail_from == FROM
    assert ack.rcpt_tos == agent.rcpt_tos == ["ayse@customer.example"]
    ack_mail, agent_mail = received(submission, 0), received(submission, 1)
    assert ack_mail["From"] == agent_mail["From"] == FROM
    assert ack_mail["Auto-Submitted"] == "auto-replied"
    assert agent_mail["Auto-Submitted"] is None


async def test_with_the_setting_off_an_acknowledgement_keeps_the_normal_sender(
    submission: SmtpSink,
) -> None:
    """Off by default: a submission server that refuses <> must not fail every ack."""
    settings = smtp_settings(submission)
    assert settings.auto_reply_null_sender is False
    await SmtpSender(settings).send(reply_to(), ACK)

    await until(lambda: len(submission.recorder.messages) == 1, timeout=5)
    [command] = mail_commands(submission)
    assert envelope_sender(command) == f"FROM:<{FROM}>"
    assert submission.recorder.messages[0].mail_from == FROM
    assert received(submission, 0)["Auto-Submitted"] == "auto-replied"


async def test_a_null_sender_refused_only_after_data_also_names_the_setting() -> None:
    """Some servers take MAIL FROM:<> and refuse the mail after DATA: the failure still
    says which setting sent it with the null sender."""
    async with serving_smtp(Submission(REFUSAL, at_data=True), WireController) as server:
        sender = SmtpSender(smtp_settings(server, auto_reply_null_sender=True))
        with pytest.raises(PermanentSendError, match=r"550 .*smtp\.auto_reply_null_sender"):
            await sender.send(reply_to(), ACK)
        assert [envelope_sender(c) for c in mail_commands(server)] == ["FROM:<>"]
        assert server.recorder.messages == []


async def test_a_server_refusing_the_null_sender_fails_the_acknowledgement_for_good(
    refusing: SmtpSink,
) -> None:
    """A 550 to MAIL FROM:<> is final, and says which setting asked for it, so the
    operator knows what to turn off; agents' replies through that server still go out."""
    sender = SmtpSender(smtp_settings(refusing, auto_reply_null_sender=True))
    with pytest.raises(PermanentSendError, match=r"550 .*smtp\.auto_reply_null_sender"):
        await sender.send(reply_to(), ACK)
    assert refusing.recorder.messages == []

    await sender.send(reply_to(), ReplyContext())
    await until(lambda: len(refusing.recorder.messages) == 1, timeout=5)
    assert refusing.recorder.messages[0].mail_from == FROM


# --- through the router and the dispatcher -----------------------------------------------


async def test_the_dispatcher_sends_only_acknowledgements_with_the_null_sender(
    bus: Bus, engine: AsyncEngine, submission: SmtpSink, twilio: FakeTwilioApi
) -> None:
    """What the router decides is an acknowledgement goes out with <>; the agent's answer
    in the same thread, through the same dispatcher, keeps from_address."""
    await seed(engine)
    desk = Desk(bus, engine, submission, twilio, null_sender=True)
    await desk.start()
    try:
        first = await desk.send(mail())
        answer = ReplyRequest(
            id="agent-answer-1",
            channel="email",
            agent_id="ana",
            to=Identity(kind="email", address="ayse@acme.test"),
            text="Faturanız yolda.",
            in_reply_to=first.id,
        )
        await bus.publish(OUTBOUND, "email", answer, message_id=answer.id)
        await desk.dispatcher.idle()
        await until(lambda: len(submission.recorder.messages) == 2, timeout=5)
    finally:
        await desk.close()
    ack, reply = received_mails(submission)
    assert ack["Auto-Submitted"] == "auto-replied"
    assert reply["Auto-Submitted"] is None
    assert ack["From"] == reply["From"] == "support@example.com"
    ack_envelope, reply_envelope = submission.recorder.messages
    assert ack_envelope.mail_from == "<>"
    assert reply_envelope.mail_from == "support@example.com"
    assert [envelope_sender(c) for c in mail_commands(submission)] == [
        "FROM:<>",
        "FROM:<support@example.com>",
    ]


async def test_a_refused_null_sender_is_reported_as_outbound_failed_once(
    bus: Bus, engine: AsyncEngine, refusing: SmtpSink, twilio: FakeTwilioApi
) -> None:
    """The refusal takes the permanent path: not retried (one MAIL command), and
    ``outbound.failed`` names the setting."""
    await seed(engine)
    desk = Desk(bus, engine, refusing, twilio, null_sender=True)
    await desk.start()
    try:
        first = await desk.send(mail())
    finally:
        await desk.close()
    [failed] = await take(
        bus, EVENTS_QUEUE, 1, keep=lambda got: got.json()["type"] == "outbound.failed"
    )
    event = failed.json()
    assert event["request_id"] == f"ack:{first.id}"
    assert event["reason"].startswith("PermanentSendError: SMTP refused: 550")
    assert "smtp.auto_reply_null_sender" in event["reason"]
    assert [envelope_sender(c) for c in mail_commands(refusing)] == ["FROM:<>"]
    assert refusing.recorder.messages == []
