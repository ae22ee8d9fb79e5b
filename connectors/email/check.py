"""``omniroute check`` for email: log into every mailbox and the SMTP server."""

from connectors.email.imap import ImapSession
from connectors.email.smtp import smtp_client
from connectors.settings import EmailSettings, SmtpSettings
from ingest.errors import AuthError, ConfigError, TransientError


async def check(
    email: EmailSettings | None, smtp: SmtpSettings | None
) -> list[tuple[str, bool, str]]:
    """Log into every mailbox and the SMTP server; ``(name, ok, why)`` for each."""
    results: list[tuple[str, bool, str]] = []
    for box in email.mailboxes if email is not None else []:
        name = "imap:" + box.name
        try:
            session = await ImapSession.open(box)
        except (AuthError, ConfigError, TransientError) as exc:
            results.append((name, False, f"{type(exc).__name__}: {exc}"))
            continue
        await session.close()
        results.append((name, True, f"logged in, {box.folder} selected"))
    if smtp is not None:
        try:
            async with smtp_client(smtp):
                pass
        except (AuthError, TransientError) as exc:
            results.append(("smtp", False, f"{type(exc).__name__}: {exc}"))
        else:
            results.append(("smtp", True, "connected" + (", logged in" if smtp.username else "")))
    return results
