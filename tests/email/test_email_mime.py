"""MIME normalisation: every corpus mail, Turkish charsets, bounces, auto-replies, and
random or mangled bytes that must never raise."""

import base64
import hashlib
import re
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connectors.email.mime import UNKNOWN_SENDER, html_to_text, normalise
from ingest.schema import InboundMessage

CORPUS = Path(__file__).parent.parent / "data" / "email"
MAILS = sorted(CORPUS.rglob("*.eml"))
LOCATOR = {"mailbox": "support", "uidvalidity": 7, "uid": 42}
SMALL = sorted((p for p in MAILS if p.stat().st_size < 20_000), key=lambda p: p.name)


def parse(raw: bytes, inline_max: int = 64 * 1024) -> InboundMessage:
    return normalise(
        raw, mailbox="support", recipient="Support@Example.com", inline_max=inline_max,
        locator=LOCATOR,
    )  # fmt: skip


def has_from(raw: bytes) -> bool:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    return re.search(rb"(?im)^from:[^\n]*@", head) is not None


def test_corpus_is_there() -> None:
    """The parametrised test below must not pass vacuously."""
    assert len(MAILS) >= 60


@pytest.mark.parametrize("path", MAILS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_corpus_mail_normalises_with_a_sender(path: Path) -> None:
    """No mail a customer (or a broken client) sends may crash intake or lose its sender."""
    raw = path.read_bytes()
    message = parse(raw)
    assert message.channel == "email"
    assert message.external_id
    assert message.recipient is not None
    assert message.recipient.address == "support@example.com"
    if has_from(raw):
        assert message.sender.address != UNKNOWN_SENDER
        assert "sender_missing" not in message.meta
    else:
        assert message.sender.address == UNKNOWN_SENDER
        assert message.meta["sender_missing"] is True


@pytest.mark.parametrize(
    ("name", "sender", "subject"),
    [
        ("talon-replies/gmail.eml", "xxx@gmail.com", "Re: Test"),
        ("talon-replies/apple_mail_2.eml", "adam@tictail.com", "Re: Hello there"),
        ("flanker/8bitmime.eml", "bob@example.com", "2 RCPT MIME"),
        ("flanker/torture.eml", "mrc@cac.washington.edu", "Multi-media mail demonstration"),
        (
            "flanker/bilingual-simple.eml",
            "hello@example.com",
            "Simple text. How are you? Как ты поживаешь?",
        ),
        (
            "flanker/from-encoding.eml",
            "ingo@blank.pages.de",
            "Re: running server as root (Was: Re: PUT method)",
        ),
    ],
)
def test_named_mails_decode_subject_and_sender(name: str, sender: str, subject: str) -> None:
    """Encoded words are decoded and addresses case-folded, as the files say."""
    message = parse((CORPUS / name).read_bytes())
    assert message.sender.address == sender
    assert message.subject == subject


def test_huge_subject_is_bounded() -> None:
    """long-header.eml repeats its subject for 200 kB; a ticket title must stay sane."""
    message = parse((CORPUS / "flanker/long-header.eml").read_bytes())
    assert message.subject is not None
    assert message.subject.startswith("Die heiße Zypernsonne quälte Max und Victoria ja böse")
    assert len(message.subject) <= 998
    assert message.meta["subject_truncated"] is True


def test_display_name_and_thread_ids_without_brackets() -> None:
    """One canonical Message-ID form (no <>) so the router's thread lookup matches."""
    message = parse((CORPUS / "talon-replies/apple_mail_2.eml").read_bytes())
    assert message.sender.name == "Adam Renberg"
    assert message.thread is not None
    for value in [
        message.thread.message_id,
        message.thread.in_reply_to,
        *message.thread.references,
    ]:
        assert value is None or ("<" not in value and ">" not in value)
    assert message.external_id == message.thread.message_id


TR_TEXT = "Şikâyetim: faturadaki ücret yanlış, lütfen düzeltin. İyi günler, Ğğ Çç Öö Üü"
TR_SUBJECT = "Fatura sorunu: ığüşöç İĞ"


def turkish(charset: str, *, html: bool = False) -> bytes:
    """A mail as a Turkish client writes it: 8-bit body and encoded-word headers."""
    codec = charset.replace("windows-", "cp")
    body = f"<html><body><p>{TR_TEXT}</p><script>x()</script></body></html>" if html else TR_TEXT
    subject = base64.b64encode(TR_SUBJECT.encode(codec)).decode()
    name = base64.b64encode("Şükrü Yılmaz".encode(codec)).decode()
    head = (
        f"From: =?{charset}?B?{name}?= <Sukru@Example.com.tr>\r\n"
        "To: destek@example.com\r\n"
        f"Subject: =?{charset}?B?{subject}?=\r\n"
        "Message-ID: <tr-1@example.com.tr>\r\n"
        "MIME-Version: 1.0\r\n"
        f"Content-Type: text/{'html' if html else 'plain'}; charset={charset}\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode("ascii") + body.encode(codec)


@pytest.mark.parametrize("charset", ["windows-1254", "iso-8859-9", "ISO-8859-9"])
def test_turkish_charsets_decode_right(charset: str) -> None:
    """ş, ğ, ı, İ live where Latin-1 has other letters; a wrong guess garbles every mail."""
    message = parse(turkish(charset))
    assert message.text == TR_TEXT
    assert message.subject == TR_SUBJECT
    assert message.sender.name == "Şükrü Yılmaz"
    assert message.sender.address == "sukru@example.com.tr"
    html = parse(turkish(charset, html=True))
    assert html.text == TR_TEXT
    assert "x()" not in html.text


def test_unknown_charset_falls_back_instead_of_raising() -> None:
    """A made-up charset label decodes with replacement characters, never an exception."""
    raw = (
        b"From: a@example.com\r\nSubject: =?x-klingon?Q?qapla=E9?=\r\n"
        b"Content-Type: text/plain; charset=x-klingon\r\n\r\nhello \xff\xfe world"
    )
    message = parse(raw)
    assert message.text.startswith("hello")
    assert message.text.endswith("world")
    assert message.subject is not None


def test_html_only_mail_becomes_readable_text() -> None:
    """Agents read text; HTML tags, scripts and styles must not reach them."""
    assert html_to_text("<style>p{}</style><p>Hello&nbsp;<b>you</b></p><p>Bye</p>") == (
        "Hello you\n\nBye"
    )


def test_attachments_inline_when_small_and_located_when_large() -> None:
    """Big files stay on the IMAP server; the locator finds them again."""
    msg = EmailMessage()
    msg["From"] = "a@example.com"
    msg["Message-ID"] = "<att@example.com>"
    msg.set_content("see attached")
    msg.add_attachment(b"small", maintype="application", subtype="pdf", filename="s.pdf")
    big = bytes(range(256)) * 100
    msg.add_attachment(big, maintype="image", subtype="png", filename="b.png")
    message = parse(msg.as_bytes(), inline_max=1000)
    small, large = message.attachments
    assert (small.filename, small.content_type, small.size) == ("s.pdf", "application/pdf", 5)
    assert small.content_b64 == base64.b64encode(b"small").decode()
    assert small.sha256 == hashlib.sha256(b"small").hexdigest()
    assert large.content_b64 is None
    assert large.sha256 == hashlib.sha256(big).hexdigest()
    assert large.locator is not None
    assert large.locator["uid"] == 42
    assert large.locator["uidvalidity"] == 7
    assert message.text == "see attached"


@pytest.mark.parametrize(
    "name",
    [
        "flanker/bounce_zed.eml",
        "flanker/bounce_office365.eml",
        "flanker/bounce_mailbox-full.eml",
        "flanker/bounce_gmail-invalid-address.eml",
        "flanker/bounce_delayed.eml",
    ],
)
def test_bounces_are_marked(name: str) -> None:
    """A delivery report goes to triage, never to a customer's agent."""
    message = parse((CORPUS / name).read_bytes())
    assert message.meta["bounce"] is True
    assert message.meta["bounce_why"]


def test_customer_mail_is_neither_bounce_nor_auto_reply() -> None:
    message = parse((CORPUS / "talon-replies/gmail.eml").read_bytes())
    assert "bounce" not in message.meta
    assert "auto_reply" not in message.meta


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ("Auto-Submitted: auto-replied", "Auto-Submitted: auto-replied"),
        ("Precedence: bulk", "Precedence: bulk"),
        ("Precedence: auto_reply", "Precedence: auto_reply"),
        ("X-Autoreply: yes", "x-autoreply header"),
        ("Subject: Automatic reply: Faturam", "subject"),
    ],
)
def test_auto_replies_are_marked_with_why(header: str, why: str) -> None:
    """Vacation answers are never answered back: that is how mail loops start."""
    raw = f"From: a@example.com\r\n{header}\r\n\r\nI am away.".encode()
    message = parse(raw)
    assert message.meta["auto_reply"] is True
    assert message.meta["auto_reply_why"] == why


def test_auto_submitted_no_is_a_person() -> None:
    raw = b"From: a@example.com\r\nAuto-Submitted: no\r\n\r\nhi"
    assert "auto_reply" not in parse(raw).meta


def test_mail_without_message_id_gets_a_content_hash() -> None:
    """Dedup still works for clients that send no Message-ID."""
    raw = b"From: a@example.com\r\nSubject: x\r\n\r\nbody"
    message = parse(raw)
    assert message.external_id == "sha256:" + hashlib.sha256(raw).hexdigest()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(raw: bytes) -> None:
    """A stranger's bytes get a message, not a traceback."""
    message = parse(raw)
    assert message.sender.address


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SMALL),
    st.lists(st.tuples(st.integers(0, 20_000), st.binary(min_size=0, max_size=8)), max_size=8),
    st.integers(0, 20_000),
)
def test_mutated_corpus_mails_never_raise(
    path: Path, edits: list[tuple[int, bytes]], cut: int
) -> None:
    """Truncated and corrupted real mails (broken boundaries, headers, encodings) parse."""
    raw = bytearray(path.read_bytes())
    for position, junk in edits:
        at = position % (len(raw) + 1)
        raw[at : at + len(junk)] = junk
    message = parse(bytes(raw[: cut or None]))
    assert message.external_id


def test_inline_attachment_content_is_bounded_per_message() -> None:
    """Many attachments at the limit must not add up to a message the broker refuses."""
    from email.message import EmailMessage

    from connectors.email.mime import normalise

    mail = EmailMessage()
    mail["From"] = "ayse@acme.test"
    mail["Subject"] = "logs"
    mail["Message-ID"] = "<many@acme.test>"
    mail.set_content("see attached")
    for i in range(5):
        mail.add_attachment(
            bytes([i]) * 1000,
            maintype="application",
            subtype="octet-stream",
            filename=f"log{i}.bin",
        )
    message = normalise(
        mail.as_bytes(), mailbox="support", recipient=None, inline_max=2500, locator={"uid": 1}
    )
    inline = [a for a in message.attachments if a.content_b64]
    located = [a for a in message.attachments if a.locator]
    assert len(message.attachments) == 5
    assert len(inline) == 2
    assert len(located) == 3
    assert all(a.sha256 and a.size == 1000 for a in message.attachments)


def test_a_mail_the_parser_fails_on_still_reaches_a_person_with_its_sender() -> None:
    """A mail that was not parsed keeps what a header scan reads (issue 13): routed as
    ``unknown@invalid`` it would reach nobody who knows the customer."""
    from connectors.email.mime import stand_in

    raw = (
        b"From: =?utf-8?b?QXnFn2U=?= <Ayse@Acme.test>\r\nSubject: =?utf-8?q?fatura_sorunu?=\r\n"
        b"Message-ID: <m1@acme.test>\r\nIn-Reply-To: <r1@omniroute.test>\r\n\r\nbody"
    )
    locator = {"mailbox": "support", "uidvalidity": 7, "uid": 42}
    message = stand_in(
        raw,
        mailbox="support",
        recipient="support@x.test",
        locator=locator,
        reason="parse_timeout",
        detail="parse_timeout: over 5 s of CPU",
    )
    assert message.meta["unparsed"] is True
    assert message.meta["unparsed_reason"] == "parse_timeout"
    assert message.sender.address == "ayse@acme.test"
    assert message.sender.name == "Ayşe"
    assert message.subject == "fatura sorunu"
    assert message.external_id == "m1@acme.test"
    assert message.thread is not None
    assert message.thread.in_reply_to == "r1@omniroute.test"
    assert message.attachments[0].locator == locator
    assert message.attachments[0].size == len(raw)
    assert message.recipient is not None
    nameless = stand_in(
        b"Subject: x\r\n\r\n", mailbox="s", recipient=None, locator={}, reason="r", detail="d"
    )
    assert nameless.sender.address == UNKNOWN_SENDER
    assert nameless.external_id.startswith("sha256:")


def test_over_long_message_ids_keep_the_sender() -> None:
    """An id past RFC 5322's line limit made ``Thread`` refuse the message, and the old
    stand-in routed the customer's mail as ``unknown@invalid``."""
    from tests.hostile_mail import SENDER, huge_ids

    message = parse(huge_ids("long", 5000))
    assert message.sender.address == SENDER
    assert message.external_id.startswith("sha256:") or len(message.external_id) <= 500
    assert message.thread is not None
    ids = [*message.thread.references, message.thread.in_reply_to or ""]
    assert all(len(i) <= 998 for i in ids)


def test_a_punycode_body_is_read_as_unknown_charset_not_decoded() -> None:
    """punycode is a codec, not a mail charset, and quadratic: 200 KB took 5 s."""
    from tests.hostile_mail import punycode_body

    started = time.process_time()
    message = parse(punycode_body("p", 200_000))
    assert time.process_time() - started < 1.0
    assert message.text.startswith("-bbbb")  # read as UTF-8, not decoded as punycode


def test_a_charset_with_a_nul_in_it_is_not_a_crash() -> None:
    """Found by the mutation test above: the stdlib raises ValueError (not LookupError)
    for a charset label with a NUL in it, in its own payload decoding and in
    ``codecs.lookup``; the text is still read, as UTF-8."""
    single = (
        b'From: a@b.example\r\nContent-Type: text/plain; charset="ut\x00f-8"\r\n\r\nMerhaba\r\n'
    )
    assert parse(single).text == "Merhaba"
    multipart = (
        b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b'--b\r\nContent-Type: text/plain; charset="iso\x00-8859-9"\r\n\r\nSelam\r\n--b--\r\n'
    )
    assert parse(multipart).text == "Selam"
