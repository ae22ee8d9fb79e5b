"""Turning one raw RFC 5322 mail into an ``InboundMessage``, never dropping a sender.

Sole purpose: whatever a stranger sends (malformed MIME, unknown charsets, no ``From``)
becomes a message the router can route, with what it could not read said in ``meta``.
``normalise`` raises only ``MemoryError`` and ``RecursionError``: it runs in a parse
worker (``connectors.parse_pool``) whose limits make those, and the pool routes a
``stand_in`` instead, as it does for a mail the pre-checks refuse.

Message-IDs are kept in one canonical form everywhere (``thread.message_id``,
``in_reply_to``, ``references`` and ``external_id``): without the angle brackets of RFC 5322
section 3.6.4 and surrounding space, the form ``routers.state.strip_brackets`` compares in,
so an answer to a Message-ID omniroute generated matches it as written.
"""

import base64
import codecs
import contextlib
import email
import email.header
import email.utils
import functools
import hashlib
import re
from collections.abc import Sequence
from email import policy
from email.message import EmailMessage, Message
from email.policy import EmailPolicy
from html.parser import HTMLParser
from typing import Any

from connectors.authresults import read_auth
from connectors.mail_scan import scan_head
from ingest.identities import InvalidIdentity, normalise_email
from ingest.schema import Attachment, Identity, InboundMessage, Thread

UNKNOWN_SENDER = "unknown@invalid"
MAX_TEXT = 512 * 1024
#: RFC 5322 section 2.1.1 line limit; a subject is a ticket title, not a payload
MAX_SUBJECT = 998
MAX_ATTACHMENTS = 100
MAX_DEPTH = 20
#: RFC 5322 line limit: a longer id is not an id (and ``Thread`` refuses it)
MAX_ID = 998
_MSG_ID = re.compile(r"<([^<>\s]{1,998})>")
_ADDRESS = re.compile(r"[^\s<>()\"',;:@]+@[^\s<>()\"',;:@]+\.[^\s<>()\"',;:@]+")
#: charset labels mail clients write that Python's codecs do not know under that name
_CHARSET_ALIASES = {
    "iso-8859-8-i": "iso-8859-8",
    "ks_c_5601-1987": "cp949",
    "x-mac-turkish": "mac_turkish",
    "windows-874": "cp874",
    "unknown-8bit": "utf-8",
    "x-unknown": "utf-8",
}
#: codecs that decode text but are no mail charset, some slow on purpose-built input
#: (punycode is quadratic: a 200 KB body took 5 s); such a label is read as unknown
_NOT_CHARSETS = frozenset(
    {"punycode", "idna", "unicode-escape", "raw-unicode-escape", "undefined"}
)
_AUTO_HEADERS = ("x-autoreply", "x-autorespond", "x-autoresponder", "x-vacation")
_AUTO_SUBJECTS = (
    "auto:",
    "automatic reply",
    "autoreply",
    "auto-reply",
    "out of office",
    "out of the office",
    "abwesenheitsnotiz",
    "otomatik yanıt",
)
_BOUNCE_SENDERS = ("mailer-daemon", "postmaster")


def stand_in(
    raw: bytes,
    *,
    mailbox: str,
    recipient: str | None,
    locator: dict[str, Any],
    reason: str,
    detail: str,
    size: int | None = None,
) -> InboundMessage:
    """The message for a mail that was not parsed (a limit tripped, the parser failed):
    routed like any other, with what a bounded header scan could read of its sender,
    Message-ID and Subject, and a locator to the original, which stays in the mailbox.
    With ``size``, ``raw`` is only the mail's beginning: the attachment says the real size
    and no digest of the whole."""
    digest = hashlib.sha256(raw).hexdigest()
    meta: dict[str, Any] = {
        "unparsed": True,
        "unparsed_reason": reason,
        "error": detail[:300],
        "mailbox": mailbox,
    }
    original = Attachment(
        filename=None,
        content_type="message/rfc822",
        size=len(raw) if size is None else size,
        sha256=digest if size is None else None,
        locator=locator,
    )
    try:
        head = scan_head(raw)
        message_id = head.message_id if head.message_id and len(head.message_id) <= 500 else None
        if head.sender is None:
            meta["sender_missing"] = True
        return InboundMessage(
            channel="email",
            external_id=message_id or "sha256:" + digest,
            sender=Identity(
                kind="email", address=head.sender or UNKNOWN_SENDER, name=head.sender_name
            ),
            recipient=_recipient(recipient),
            subject=head.subject,
            text="",
            thread=Thread(message_id=message_id, in_reply_to=head.in_reply_to),
            attachments=[original],
            meta=meta,
        )
    except Exception:  # the scan read something the schema refuses: keep the mail anyway
        meta["sender_missing"] = True
        return InboundMessage(
            channel="email",
            external_id="sha256:" + digest,
            sender=Identity(kind="email", address=UNKNOWN_SENDER),
            recipient=_recipient(recipient),
            attachments=[original],
            meta=meta,
        )


class _HeaderCachePolicy(EmailPolicy):
    """``policy.default``, with a header's parsed object reused within one mail.

    Sole purpose: speed. ``email.headerregistry`` builds a new header object on every
    access: Content-Type alone was parsed nine times per mail, a quarter of a mail's cost.
    ``normalise`` empties the cache at the start of each mail, so a hostile mail's parse
    trees never stay behind to cost the next one memory; header objects are read-only here.
    """

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name") or len(value) > _CACHED_VALUE:
            return super().header_fetch_parse(name, value)
        return _parsed_header(name, value)


_CACHED_VALUE = 512
_CACHED_HEADERS = 256
_POLICY = _HeaderCachePolicy()


@functools.lru_cache(maxsize=_CACHED_HEADERS)
def _parsed_header(name: str, value: str) -> Any:
    return policy.default.header_fetch_parse(name, value)


def normalise(
    raw: bytes,
    *,
    mailbox: str,
    recipient: str | None,
    inline_max: int,
    locator: dict[str, Any],
    trusted_authserv_ids: Sequence[str] = (),
) -> InboundMessage:
    """The message a raw mail says; ``locator`` (mailbox, UIDVALIDITY, UID) finds it again.
    ``meta.auth`` carries SPF/DKIM/DMARC from the receiving servers named by
    ``trusted_authserv_ids`` only (issue 13: anyone can write such a header)."""
    meta: dict[str, Any] = {"mailbox": mailbox}
    _parsed_header.cache_clear()  # nothing one mail parsed outlives it (issue 13)
    try:
        msg: Message = email.message_from_bytes(raw, policy=_POLICY)
    except (MemoryError, RecursionError):
        raise  # the parse pool's limits: it routes a stand-in
    except Exception as exc:  # the parser is lenient; this is a last resort for a library bug
        detail = f"parser_error: {type(exc).__name__}: {exc}"
        return stand_in(
            raw,
            mailbox=mailbox,
            recipient=recipient,
            locator=locator,
            reason="parser_error",
            detail=detail,
        )
    sender = _sender(msg, meta)
    reply_to = _addresses(_header(msg, "Reply-To"))
    if reply_to:
        meta["reply_to"] = reply_to
    thread = Thread(
        message_id=_first_id(_header(msg, "Message-ID")),
        in_reply_to=_first_id(_header(msg, "In-Reply-To")),
        references=_all_ids(_header(msg, "References")),
    )
    subject = _one_line(_header(msg, "Subject"))
    if subject is not None and len(subject) > MAX_SUBJECT:
        subject = subject[:MAX_SUBJECT]
        meta["subject_truncated"] = True
    date = _date(_header(msg, "Date"))
    if date:
        meta["date"] = date
    if trusted_authserv_ids:
        results = [
            str(value)
            for key, value in msg.raw_items()
            if key.lower() == "authentication-results"
        ]
        auth = read_auth(results, trusted_authserv_ids)
        if auth is not None:
            meta["auth"] = auth
    body = _body_part(msg)
    text = _text_of(body) if body is not None else ""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT]
        meta["text_truncated"] = True
    attachments = _attachments(msg, body, inline_max, locator, meta)
    _mark_automatic(msg, sender.address, subject, meta)
    defects = sum(len(getattr(p, "defects", ())) for p in _safe_walk(msg))
    if defects:
        meta["mime_defects"] = defects
    return InboundMessage(
        channel="email",
        external_id=_external_id(thread.message_id, raw),
        sender=sender,
        recipient=_recipient(recipient),
        subject=subject,
        text=text,
        thread=thread,
        attachments=attachments,
        meta=meta,
    )


# --- headers --------------------------------------------------------------------------


def _header(msg: Message, name: str) -> str | None:
    """A header's decoded value; a header the strict parser rejects is read raw instead."""
    try:
        value = msg.get(name)
        return None if value is None else str(value)
    except Exception:  # policy.default's header parser raises on some malformed headers
        for key, raw_value in msg.raw_items():
            if key.lower() == name.lower():
                return _decode_words(str(raw_value))
        return None


def _decode_words(value: str) -> str:
    try:
        parts = email.header.decode_header(value)
    except Exception:
        return value
    out = []
    for chunk, charset in parts:
        out.append(chunk if isinstance(chunk, str) else _decode(chunk, charset))
    return "".join(out)


def _one_line(value: str | None) -> str | None:
    if value is None:
        return None
    return " ".join(value.split()) or None


def _addresses(value: str | None) -> list[str]:
    if not value:
        return []
    out = []
    for _, addr in email.utils.getaddresses([value]):
        try:
            out.append(normalise_email(addr))
        except InvalidIdentity:
            continue
    return out


def _sender(msg: Message, meta: dict[str, Any]) -> Identity:
    """From's first address; a regex rescue for a broken one; ``unknown@invalid`` if none."""
    value = _header(msg, "From")
    name: str | None = None
    address: str | None = None
    if value:
        try:
            found = email.utils.getaddresses([value])
        except Exception:
            found = []
        for display, addr in found:
            try:
                address = normalise_email(addr)
            except InvalidIdentity:
                continue
            name = _one_line(display)
            break
        if address is None:
            match = _ADDRESS.search(value)
            if match:
                address = match.group(0).casefold()
                meta["sender_unparsed"] = True
    if address is None:
        meta["sender_missing"] = True
        address = UNKNOWN_SENDER
    return Identity(kind="email", address=address[:512], name=name)


def _recipient(recipient: str | None) -> Identity | None:
    if not recipient:
        return None
    try:
        return Identity(kind="email", address=normalise_email(recipient))
    except InvalidIdentity:
        return None


def _first_id(value: str | None) -> str | None:
    ids = _all_ids(value)
    return ids[0] if ids else None


def _all_ids(value: str | None) -> list[str]:
    """Message-IDs without ``<>``; a bare id without brackets is taken as written."""
    if not value:
        return []
    found = _MSG_ID.findall(value)
    if not found:
        found = [w.strip("<>") for w in value.split()[:100] if 0 < len(w.strip("<>")) <= MAX_ID]
    return list(dict.fromkeys(found))[:100]


def _date(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).isoformat()
    except Exception:
        return None


def _external_id(message_id: str | None, raw: bytes) -> str:
    if message_id and len(message_id) <= 500:
        return message_id
    if message_id:
        return "sha256:" + hashlib.sha256(message_id.encode("utf-8", "replace")).hexdigest()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


# --- body -----------------------------------------------------------------------------


def _safe_walk(msg: Message) -> list[Message]:
    """Every part, depth-bounded (a mail nesting itself forever ends here, not in a crash)."""
    out: list[Message] = []

    def visit(part: Message, depth: int) -> None:
        out.append(part)
        if depth >= MAX_DEPTH or len(out) > 10 * MAX_ATTACHMENTS:
            return
        payload = _raw_payload(part)
        if isinstance(payload, list):
            for child in payload:
                if isinstance(child, Message):
                    visit(child, depth + 1)

    visit(msg, 0)
    return out


def _body_part(msg: Message) -> Message | None:
    """The plain text part, else the HTML one; a non-MIME mail is its own body."""
    # get_body walks arbitrary structures; on failure fall back to our own bounded walk
    with contextlib.suppress(Exception):
        if isinstance(msg, EmailMessage):
            body = msg.get_body(preferencelist=("plain", "html"))
            if body is not None:
                return body
    for kind in ("text/plain", "text/html"):
        for part in _safe_walk(msg):
            if _content_type(part) == kind and not _is_attachment(part):
                return part
    return msg if not msg.is_multipart() and _content_type(msg).startswith("text/") else None


def _content_type(part: Message) -> str:
    try:
        return part.get_content_type()
    except Exception:
        return "application/octet-stream"


def _is_attachment(part: Message) -> bool:
    try:
        return part.get_content_disposition() == "attachment"
    except Exception:
        return False


def _text_of(part: Message) -> str:
    data = _payload(part)
    try:
        charset = part.get_content_charset()
    except Exception:
        charset = None
    text = _decode(data, charset)
    if _content_type(part) == "text/html":
        text = html_to_text(text)
    return text.replace("\r\n", "\n").strip()


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        data = None
    if isinstance(data, bytes):
        return data
    try:
        return part.as_bytes()
    except Exception:
        return str(_raw_payload(part) or "").encode("utf-8", "replace")


def _raw_payload(part: Message) -> Any:
    """The undecoded payload, or None: the stdlib decodes a part's bytes with its declared
    charset even here, and a charset with a NUL in it raises ValueError."""
    try:
        return part.get_payload()
    except Exception:
        return None


def _decode(data: bytes, charset: str | None) -> str:
    """Declared charset if it reads cleanly, else UTF-8, else the declared one (or UTF-8)
    with replacement characters: an unknown or wrong label never raises."""
    codec: str | None = None
    if charset:
        label = charset.strip().strip('"').lower()
        label = _CHARSET_ALIASES.get(label, label)
        try:
            codec = codecs.lookup(label).name
            codec = None if codec in _NOT_CHARSETS else codec
        except (LookupError, ValueError):  # unknown, or not even a name (a NUL in it)
            codec = None
    for candidate in (codec, "utf-8"):
        if candidate is None:
            continue
        try:
            return data.decode(candidate)
        except (UnicodeDecodeError, LookupError):
            continue
    return data.decode(codec or "utf-8", errors="replace")


class _TextExtractor(HTMLParser):
    _BLOCK = frozenset(
        {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table"}
    )
    _SKIP = frozenset({"script", "style", "head", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif tag in self._BLOCK:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self._BLOCK:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.chunks.append(data)


def html_to_text(html: str) -> str:
    """Readable text from HTML: tags dropped, blocks on their own lines, blank runs folded."""
    parser = _TextExtractor()
    with contextlib.suppress(Exception):  # html.parser is lenient; keep what was read
        parser.feed(html)
        parser.close()
    lines = [" ".join(line.split()) for line in "".join(parser.chunks).splitlines()]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- attachments ----------------------------------------------------------------------


def _attachments(
    msg: Message,
    body: Message | None,
    inline_max: int,
    locator: dict[str, Any],
    meta: dict[str, Any],
) -> list[Attachment]:
    """Leaf parts other than the body and its alternatives; an attached mail is one part."""
    out: list[Attachment] = []
    index = 0
    # inline_max bounds the inline content of the whole message, not of each part: a
    # hundred attachments at the limit would make a message the broker refuses for ever
    budget = inline_max

    def visit(part: Message, depth: int) -> None:
        nonlocal index, budget
        index += 1
        ctype = _content_type(part)
        payload = part.get_payload()
        if ctype.startswith("multipart/") and isinstance(payload, list) and depth < MAX_DEPTH:
            for child in payload:
                if isinstance(child, Message):
                    visit(child, depth + 1)
            return
        if part is body or (ctype in ("text/plain", "text/html") and not _named(part)):
            return
        if len(out) >= MAX_ATTACHMENTS:
            meta["attachments_truncated"] = True
            return
        data = _attached_bytes(part, ctype)
        filename = _filename(part)
        item = Attachment(
            filename=filename,
            content_type=ctype,
            size=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        if len(data) <= budget:
            item.content_b64 = base64.b64encode(data).decode("ascii")
            budget -= len(data)
        else:
            item.locator = {**locator, "part": index}
        out.append(item)

    try:
        visit(msg, 0)
    except Exception:  # a structure we cannot walk keeps the text, and says so
        meta["attachments_unreadable"] = True
    return out


def _named(part: Message) -> bool:
    return _is_attachment(part) or _filename(part) is not None


def _filename(part: Message) -> str | None:
    try:
        name = part.get_filename()
    except Exception:
        return None
    return _one_line(str(name)) if name else None


def _attached_bytes(part: Message, ctype: str) -> bytes:
    if ctype.startswith("message/"):
        payload = part.get_payload()
        if isinstance(payload, list) and payload and ctype == "message/rfc822":
            inner = payload[0]
            with contextlib.suppress(Exception):  # a broken inner mail: its raw text below
                if isinstance(inner, Message):
                    return inner.as_bytes()
        try:
            return part.as_bytes().split(b"\n\n", 1)[-1]
        except Exception:
            return str(payload).encode("utf-8", "replace")
    return _payload(part)


# --- auto-replies and bounces (RFC 3834, RFC 3464) --------------------------------------


def _mark_automatic(msg: Message, sender: str, subject: str | None, meta: dict[str, Any]) -> None:
    ctype = _content_type(msg)
    try:
        report_type = str(msg.get_param("report-type", "") or "").lower()
    except Exception:
        report_type = ""
    has_status = any(_content_type(p) == "message/delivery-status" for p in _safe_walk(msg))
    local = sender.partition("@")[0]
    bounce_why: str | None = None
    if ctype == "multipart/report" and report_type == "delivery-status":
        bounce_why = "multipart/report; report-type=delivery-status"
    elif has_status:
        bounce_why = "message/delivery-status part"
    elif local in _BOUNCE_SENDERS:
        bounce_why = "sender " + local
    elif _header(msg, "X-Failed-Recipients"):
        bounce_why = "X-Failed-Recipients"
    if bounce_why:
        meta["bounce"] = True
        meta["bounce_why"] = bounce_why

    auto_why: str | None = None
    submitted = (_header(msg, "Auto-Submitted") or "").strip().lower()
    precedence = (_header(msg, "Precedence") or "").strip().lower()
    lowered_subject = (subject or "").lower()
    if submitted and submitted != "no":
        auto_why = "Auto-Submitted: " + submitted
    elif precedence in ("bulk", "auto_reply", "junk"):
        auto_why = "Precedence: " + precedence
    elif any(_header(msg, h) is not None for h in _AUTO_HEADERS):
        auto_why = next(h for h in _AUTO_HEADERS if _header(msg, h) is not None) + " header"
    elif ctype == "multipart/report" and report_type:
        auto_why = "multipart/report; report-type=" + report_type
    elif lowered_subject.startswith(_AUTO_SUBJECTS):
        auto_why = "subject"
    if auto_why:
        meta["auto_reply"] = True
        meta["auto_reply_why"] = auto_why
