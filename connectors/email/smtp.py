"""Replies out by SMTP (aiosmtplib), threaded so the customer's answer routes back to
the agent who wrote (``In-Reply-To``/``References``, RFC 5322 section 3.6.4); an automatic
answer (an acknowledgement) carries ``Auto-Submitted: auto-replied`` (RFC 3834) and, with
``smtp.auto_reply_null_sender``, the null envelope sender ``MAIL FROM:<>``."""

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from email.utils import formataddr, formatdate, make_msgid

import aiosmtplib
import structlog

from connectors.email.imap import tls_context
from connectors.settings import SmtpSettings
from ingest.errors import AuthError, PermanentSendError, TransientError
from ingest.identities import InvalidIdentity, normalise_email, redact
from ingest.protocols import ReplyContext, SendResult
from ingest.schema import ReplyRequest

log = structlog.get_logger("omniroute.email")
_RE_PREFIX = re.compile(r"^\s*((re|aw|sv|ynt|fwd?)(\[\d+\])?\s*:\s*)+", re.IGNORECASE)


def reply_subject(subject: str | None) -> str:
    """Exactly one ``Re:``: earlier ``Re:``/``AW:``/``Fwd:`` chains are folded into it."""
    base = _RE_PREFIX.sub("", " ".join((subject or "").split()))
    return "Re: " + base if base else "Re:"


def _bracket(message_id: str) -> str:
    return "<" + message_id.strip().strip("<>").strip() + ">"


class SmtpSender:
    """The outbound dispatcher's ``Sender`` for channel ``email``: answers in the thread."""

    channel = "email"

    def __init__(self, settings: SmtpSettings, *, message_id_domain: str | None = None) -> None:
        self._settings = settings
        self._domain = message_id_domain or settings.from_address.rpartition("@")[2]

    def build(self, reply: ReplyRequest, context: ReplyContext) -> EmailMessage:
        """The reply as a MIME message; a header that would need CR/LF is refused for good."""
        original = context.original
        thread = original.thread if original is not None else None
        parent = thread.message_id if thread is not None else None
        if parent is None and reply.in_reply_to and "@" in reply.in_reply_to:
            parent = reply.in_reply_to.strip().strip("<>")
        references = list(thread.references) if thread is not None else []
        if parent and parent not in references:
            references.append(parent)
        if len(references) > 20:  # RFC 5322 3.6.4: keep the first and the most recent
            references = [references[0], *references[-19:]]
        subject = original.subject if original is not None and original.subject else None
        msg = EmailMessage()
        try:
            msg["From"] = self._settings.from_address
            msg["To"] = formataddr((reply.to.name or "", reply.to.address))
            msg["Subject"] = reply_subject(subject or reply.subject)
            msg["Date"] = formatdate(localtime=False)
            msg["Message-ID"] = make_msgid(domain=self._domain)
            if parent:
                msg["In-Reply-To"] = _bracket(parent)
            if references:
                msg["References"] = " ".join(_bracket(r) for r in references)
            if context.auto_reply:
                # RFC 3834 section 5: an automatic answer says so, and compliant responders
                # (omniroute among them) never answer it; Exchange honours the second
                msg["Auto-Submitted"] = "auto-replied"
                msg["X-Auto-Response-Suppress"] = "All"
            msg.set_content(reply.text)
        except (ValueError, TypeError) as exc:
            raise PermanentSendError(f"reply cannot be written as a mail: {exc}") from exc
        return msg

    async def send(self, reply: ReplyRequest, context: ReplyContext) -> SendResult:
        try:
            recipient = normalise_email(reply.to.address)
        except InvalidIdentity as exc:
            raise PermanentSendError(f"not an email address: {redact(reply.to.address)}") from exc
        msg = self.build(reply, context)
        message_id = str(msg["Message-ID"]).strip().strip("<>")
        # RFC 3834 section 3.3: an automatic answer's envelope sender should be null, so that
        # a bounce of it goes nowhere. Only when asked: submission servers often refuse it.
        # aiosmtplib writes "" as MAIL FROM:<>; None takes the From header's address.
        null_sender = context.auto_reply and self._settings.auto_reply_null_sender
        started = time.monotonic()
        async with smtp_client(self._settings) as client:
            try:
                async with asyncio.timeout(self._settings.timeout):
                    await client.send_message(
                        msg, sender="" if null_sender else None, recipients=[recipient]
                    )
            except aiosmtplib.SMTPRecipientsRefused as exc:
                codes = [e.code for e in exc.recipients]
                if any(code >= 500 for code in codes):
                    raise PermanentSendError(f"recipient refused: {codes}") from exc
                raise TransientError(f"recipient deferred: {codes}") from exc
            except aiosmtplib.SMTPResponseException as exc:
                what = f"{exc.code} {exc.message}"
                if null_sender:  # refused at MAIL, or only after DATA (as some servers do)
                    what += (
                        " (sent with the null sender MAIL FROM:<> of"
                        " smtp.auto_reply_null_sender; turn it off if this server cannot take it)"
                    )
                if exc.code >= 500:
                    raise PermanentSendError(f"SMTP refused: {what}") from exc
                raise TransientError(f"SMTP deferred: {what}") from exc
            except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                raise TransientError(f"SMTP send failed: {exc!r}") from exc
        log.info(
            "email.reply_sent",
            to=redact(recipient),
            seconds=round(time.monotonic() - started, 3),
        )
        return SendResult(external_id=message_id, thread_message_id=message_id)


@contextlib.asynccontextmanager
async def smtp_client(settings: SmtpSettings) -> AsyncIterator[aiosmtplib.SMTP]:
    """A connected, authenticated SMTP client; STARTTLS is required when asked for."""
    context = tls_context(settings.ca_file) if settings.security != "none" else None
    client = aiosmtplib.SMTP(
        hostname=settings.host,
        port=settings.port,
        use_tls=settings.security == "tls",
        start_tls=settings.security == "starttls",
        tls_context=context,
        timeout=settings.timeout,
    )
    try:
        async with asyncio.timeout(settings.timeout):
            await client.connect()
            if settings.username:
                password = settings.password.get_secret_value() if settings.password else ""
                await client.login(settings.username, password)
    except aiosmtplib.SMTPAuthenticationError as exc:
        client.close()
        raise AuthError(f"SMTP login refused for {redact(settings.username or '')}") from exc
    except aiosmtplib.SMTPNotSupported as exc:
        client.close()
        # no STARTTLS (or no AUTH): retrying cannot help and plaintext is never an option
        raise AuthError(f"SMTP server cannot be used safely: {exc}") from exc
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        client.close()
        if settings.security == "starttls" and "STARTTLS" in str(exc):
            raise AuthError(f"SMTP server cannot be used safely: {exc}") from exc
        raise TransientError(f"SMTP connect failed: {exc!r}") from exc
    try:
        yield client
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError, TimeoutError):
            async with asyncio.timeout(settings.timeout):
                await client.quit()
        client.close()
