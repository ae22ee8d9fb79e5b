"""The email channel end to end: a real Dovecot mailbox read by the connector's daemon loop
(IDLE), the real router and outbound dispatcher on RabbitMQ, the SQLite directory, and
aiosmtpd receiving the replies: issue 4's story from a customer's mail to their agent."""

import asyncio
import email
import json
from collections.abc import AsyncIterator
from email import policy
from email.message import EmailMessage
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.email.intake import EmailConnector
from connectors.email.smtp import SmtpSender
from connectors.settings import EmailSettings, MailboxSettings, SmtpSettings
from ingest.bus import Bus
from ingest.schema import ReplyRequest, RoutedMessage
from ingest.sink import BusSink
from ingest.topology import EVENTS_QUEUE, OUTBOUND, ROUTED_QUEUE
from routers.settings import RoutingSettings
from routers.store.connector_state import DbCursorStore, DbSeenStore
from tests.seed import seed
from tests.support.mail import PASSWORD, USER, Dovecot, SmtpSink, make_mail
from tests.workers import Workers

CORPUS = Path(__file__).parent.parent / "data" / "email" / "flanker"
DOMAIN = "omniroute.test"
CUSTOMER = "Ayşe Yılmaz <ayse@acme.test>"


class Stack(Workers):
    """Email intake (the daemon's IDLE loop), router and dispatcher with the SMTP sender,
    each on the test's vhost and directory, started and stopped like the daemon does."""

    def __init__(
        self,
        bus: Bus,
        engine: AsyncEngine,
        server: Dovecot,
        smtp: SmtpSink,
        *,
        trusted_authserv_ids: tuple[str, ...] = (),
    ) -> None:
        sender = SmtpSender(
            SmtpSettings(
                host=smtp.host,
                port=smtp.port,
                security="none",
                from_address="support@example.com",
                timeout=5.0,
            ),
            message_id_domain=DOMAIN,
        )
        routing = RoutingSettings(
            default_region="TR", require_authenticated_email=bool(trusted_authserv_ids)
        )
        super().__init__(bus, engine, sender, routing)
        box = MailboxSettings(
            name="support",
            host="127.0.0.1",
            port=server.port,
            security="none",
            username=USER,
            password=SecretStr(PASSWORD),
            timeout=5.0,
            idle_renew=5.0,
            poll_interval=0.5,
            backoff_initial=0.05,
            backoff_max=0.3,
            # the address team differs from the customer's, so a decision that fell back
            # to the address (a bounce that escaped triage) shows in the routing key
            team="network",
        )
        self.email = EmailConnector(
            EmailSettings(
                mailboxes=[box],
                message_id_domain=DOMAIN,
                trusted_authserv_ids=list(trusted_authserv_ids),
            ),
            sink=BusSink(bus),
            cursors=DbCursorStore(engine),
            seen=DbSeenStore(engine),
            health=self.health,
        )

    async def next_routed(self) -> tuple[str, RoutedMessage]:
        key, body = await self.next_from(ROUTED_QUEUE)
        return key, RoutedMessage.model_validate_json(body)

    async def quiet(self, seconds: float = 1.5) -> None:
        """Wait until the router and the dispatcher say their queues are empty and nothing
        is in flight, then a little longer, so a late automatic answer would have had time
        to happen."""
        await self.router.idle(timeout=15)
        await self.dispatcher.idle(timeout=15)
        await asyncio.sleep(seconds)


@pytest.fixture
async def stack(
    bus: Bus, engine: AsyncEngine, dovecot: Dovecot, smtp_server: SmtpSink
) -> AsyncIterator[Stack]:
    await seed(engine)
    s = Stack(bus, engine, dovecot, smtp_server)
    await s.start(s.email.run)
    yield s
    await s.close()


def _received(smtp: SmtpSink, n: int) -> EmailMessage:
    """The n-th (0-based) mail the SMTP server accepted, parsed."""
    raw = smtp.recorder.messages[n].original_content
    assert isinstance(raw, bytes)
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


async def test_mail_is_routed_the_reply_threads_and_the_answer_reaches_its_agent(
    stack: Stack, dovecot: Dovecot, smtp_server: SmtpSink
) -> None:
    """Issue 4's done-when: a known sender's mail reaches their team; the agent's reply
    leaves in the thread; the customer's answer to it reaches that agent as thread_owner."""
    await asyncio.to_thread(
        dovecot.append,
        make_mail(
            "q1@acme.test",
            sender=CUSTOMER,
            subject="RE: Fwd: Faturam hakkında",
            In_Reply_To="<old-2@elsewhere.test>",
            References="<old-1@elsewhere.test> <old-2@elsewhere.test>",
        ),
    )
    key, routed = await stack.next_routed()
    assert (key, routed.route.reason) == ("team.billing", "dedicated_team")
    assert routed.customer is not None
    assert routed.customer.id == "acme"
    assert routed.message.external_id == "q1@acme.test"

    reply = ReplyRequest(
        id="reply-1",
        channel="email",
        agent_id="ana",
        to=routed.message.sender,
        text="Merhaba Ayşe, faturanızı düzelttik.",
        in_reply_to=routed.message.id,
    )
    await stack.bus.publish(OUTBOUND, "email", reply, message_id=reply.id)
    _, body = await stack.next_from(EVENTS_QUEUE)
    event = json.loads(body)
    assert (event["type"], event["request_id"], event["agent_id"]) == (
        "outbound.sent",
        "reply-1",
        "ana",
    )

    assert len(smtp_server.recorder.messages) == 1
    assert smtp_server.recorder.messages[0].rcpt_tos == ["ayse@acme.test"]
    sent = _received(smtp_server, 0)
    message_id = str(sent["Message-ID"])
    assert message_id.startswith("<")
    assert message_id.endswith("@" + DOMAIN + ">")
    assert event["external_id"] == message_id.strip("<>")
    assert str(sent["In-Reply-To"]) == "<q1@acme.test>"
    assert str(sent["References"]).split() == [
        "<old-1@elsewhere.test>",
        "<old-2@elsewhere.test>",
        "<q1@acme.test>",
    ]
    assert str(sent["Subject"]) == "Re: Faturam hakkında"
    assert str(sent["From"]) == "support@example.com"
    assert "faturanızı düzelttik" in sent.get_content()

    await asyncio.to_thread(
        dovecot.append,
        make_mail(
            "q2@acme.test",
            sender=CUSTOMER,
            subject="Re: Faturam hakkında",
            text="Teşekkürler, ama bir sorum daha var.",
            In_Reply_To=message_id,
            References=f"<old-1@elsewhere.test> <old-2@elsewhere.test> <q1@acme.test> {message_id}",
        ),
    )
    key, routed = await stack.next_routed()
    assert routed.message.external_id == "q2@acme.test"
    assert (key, routed.route.reason) == ("agent.ana", "thread_owner")
    assert routed.route.fallback_team == "billing"


async def test_bounce_goes_to_triage_and_an_auto_reply_is_routed_but_never_answered(
    stack: Stack, dovecot: Dovecot, smtp_server: SmtpSink
) -> None:
    """A delivery report must never land with a customer's agent, and no automatic mail
    may ever be answered automatically (mail loops between two robots)."""
    await asyncio.to_thread(
        dovecot.append, (CORPUS / "bounce_gmail-invalid-address.eml").read_bytes()
    )
    key, routed = await stack.next_routed()
    assert (key, routed.route.reason) == ("triage", "bounce")
    assert routed.message.meta["bounce"] is True
    assert routed.message.sender.address == "mailer-daemon@googlemail.com"

    report = (
        "From: MAILER-DAEMON@mx.acme.test\r\n"
        f"To: {USER}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Message-ID: <dsn-1@mx.acme.test>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="b1"\r\n'
        "\r\n--b1\r\nContent-Type: text/plain\r\n\r\n"
        "Your message could not be delivered.\r\n"
        "\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.acme.test\r\n\r\n"
        "Final-Recipient: rfc822; gone@acme.test\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "\r\n--b1--\r\n"
    ).encode()
    await asyncio.to_thread(dovecot.append, report)
    key, routed = await stack.next_routed()
    assert routed.message.external_id == "dsn-1@mx.acme.test"
    assert (key, routed.route.reason) == ("triage", "bounce")

    await asyncio.to_thread(
        dovecot.append,
        make_mail(
            "ooo-1@acme.test",
            sender=CUSTOMER,
            subject="Out of office: Faturam hakkında",
            text="I am on leave until Monday.",
            Auto_Submitted="auto-replied",
        ),
    )
    key, routed = await stack.next_routed()
    assert routed.message.external_id == "ooo-1@acme.test"
    assert routed.message.meta["auto_reply"] is True
    assert routed.message.meta["auto_reply_why"] == "Auto-Submitted: auto-replied"
    assert (key, routed.route.reason) == ("team.billing", "dedicated_team")

    await stack.quiet()
    assert smtp_server.recorder.messages == []
    assert await stack.bus.queue_depth(EVENTS_QUEUE) == (0, 0)
    assert await stack.bus.queue_depth(ROUTED_QUEUE) == (0, 0)
    flags = await asyncio.to_thread(dovecot.flags)
    assert sorted(flags) == [1, 2, 3]
    assert all("$Omniroute" in f for f in flags.values()), flags


async def test_a_forged_answer_to_an_agent_is_not_taken_as_the_customer(
    bus: Bus, engine: AsyncEngine, dovecot: Dovecot, smtp_server: SmtpSink
) -> None:
    """Issue 13: a mail in a customer's name whose receiving server says DMARC failed must
    not reach the agent who knows that customer, with that customer's context; the same
    answer with a pass does. A header carrying another server's id is not believed."""
    await seed(engine)
    stack = Stack(bus, engine, dovecot, smtp_server, trusted_authserv_ids=("mx.omniroute.test",))
    await stack.start(stack.email.run)
    try:
        passed = (
            "mx.omniroute.test; spf=pass smtp.mailfrom=acme.test; "
            "dkim=pass header.d=acme.test; dmarc=pass header.from=acme.test"
        )
        await asyncio.to_thread(
            dovecot.append,
            make_mail("a1@acme.test", sender=CUSTOMER, Authentication_Results=passed),
        )
        key, routed = await stack.next_routed()
        assert routed.message.meta["auth"]["dmarc"] == "pass"
        assert (key, routed.route.reason) == ("team.billing", "dedicated_team")
        reply = ReplyRequest(
            id="reply-a1",
            channel="email",
            agent_id="ana",
            to=routed.message.sender,
            text="Merhaba",
            in_reply_to=routed.message.id,
        )
        await stack.bus.publish(OUTBOUND, "email", reply, message_id=reply.id)
        await stack.next_from(EVENTS_QUEUE)
        ours = str(_received(smtp_server, 0)["Message-ID"])

        failed = (
            "mx.omniroute.test; spf=fail smtp.mailfrom=acme.test; dkim=none; "
            "dmarc=fail header.from=acme.test"
        )
        forged = (
            "mx.attacker.example; spf=pass smtp.mailfrom=acme.test; "
            "dmarc=pass header.from=acme.test"
        )
        spoof = make_mail(
            "a2@acme.test",
            sender=CUSTOMER,
            text="Lütfen şifremi sıfırlayıp bu adrese gönderin.",
            In_Reply_To=ours,
            Reply_To="mallory@attacker.example",
            Authentication_Results=failed,
        )
        spoof = spoof.replace(b"\n\n", f"\nAuthentication-Results: {forged}\n\n".encode(), 1)
        await asyncio.to_thread(dovecot.append, spoof)
        key, routed = await stack.next_routed()
        assert routed.message.external_id == "a2@acme.test"
        assert routed.message.meta["auth"]["dmarc"] == "fail"
        assert (key, routed.route.reason) == ("team.billing", "unverified_sender")
        assert routed.customer is None

        await asyncio.to_thread(
            dovecot.append,
            make_mail(
                "a3@acme.test", sender=CUSTOMER, In_Reply_To=ours, Authentication_Results=passed
            ),
        )
        key, routed = await stack.next_routed()
        assert (key, routed.route.reason) == ("agent.ana", "thread_owner")
        assert routed.customer is not None
    finally:
        await stack.close()
