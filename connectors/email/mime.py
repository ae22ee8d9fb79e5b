"""Turning one raw RFC 5322 mail into an ``InboundMessage``, never dropping a sender.

Sole purpose: whatever a stranger sends (malformed MIME, unknown charsets, no ``From``)
becomes a message the router can route, with what it could not read said in ``meta``.
``normalise`` raises only ``MemoryError`` and ``RecursionError``: it runs in a parse
worker (``connectors.parse_pool``) whose limits make those, and the pool routes a
``stand_in`` instead, as it does for a mail the pre-checks refuse.

Message-IDs are kept in one canonical form everywhere (``thread.message_id``,
``in_reply_to``, ``references`` and ``external_id``): without the angle brackets of RFC 5322
section 3.6.4 and surrounding space, the form ``routers.store.values.strip_brackets``
compares in, so an answer to a Message-ID omniroute generated matches it as written.
"""

import email
import email.header
import email.utils
import hashlib
import re
from collections.abc import Sequence
from email.message import Message
from typing import Any

from connectors.email.authresults import read_auth
from connectors.email.body import attachments as read_attachments
from connectors.email.body import body_part, content_type, decode, safe_walk, text_of
from connectors.email.body import html_to_text as html_to_text
from connectors.email.headers import POLICY, forget_headers
from connectors.email.scan import scan_head
from ingest.identities import InvalidIdentity, normalise_email
from ingest.schema import Attachment, Identity, InboundMessage, Thread

UNKNOWN_SENDER = "unknown@invalid"
MAX_TEXT = 512 * 1024
#: RFC 5322 section 2.1.1 line limit; a subject is a ticket title, not a payload
MAX_SUBJECT = 998
#: RFC 5322 line limit: a longer id is not an id (and ``Thread`` refuses it)
MAX_ID = 998
_MSG_ID = re.compile(r"<([^<>\s]{1,998})>")
_ADDRESS = re.compile(r"[^\s<>()\"',;:@]+@[^\s<>()\"',;:@]+\.[^\s<>()\"',;:@]+")
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
    forget_headers()  # nothing one mail parsed outlives it (issue 13)
    try:
        msg: Message = email.message_from_bytes(raw, policy=POLICY)
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
            str(value) for key, value in msg.raw_items() if key.lower() == "authentication-results"
        ]
        auth = read_auth(results, trusted_authserv_ids)
        if auth is not None:
            meta["auth"] = auth
    body = body_part(msg)
    text = text_of(body) if body is not None else ""
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT]
        meta["text_truncated"] = True
    attachments = read_attachments(msg, body, inline_max, locator, meta)
    _mark_automatic(msg, sender.address, subject, meta)
    defects = sum(len(getattr(p, "defects", ())) for p in safe_walk(msg))
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
        out.append(chunk if isinstance(chunk, str) else decode(chunk, charset))
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


# --- auto-replies and bounces (RFC 3834, RFC 3464) --------------------------------------


def _mark_automatic(msg: Message, sender: str, subject: str | None, meta: dict[str, Any]) -> None:
    ctype = content_type(msg)
    try:
        report_type = str(msg.get_param("report-type", "") or "").lower()
    except Exception:
        report_type = ""
    has_status = any(content_type(p) == "message/delivery-status" for p in safe_walk(msg))
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
