"""The email channel: IMAP mailboxes in (aioimaplib), replies out (aiosmtplib).

- ``imap``: one IMAP connection whose every command has a deadline;
- ``intake``: a supervised worker per mailbox (leases, reconnects, reload);
- ``batch``: what is taken from a mailbox, flagged and never lost (its invariants);
- ``scan``, ``parse_pool``, ``parse_worker``, ``mime``: a mail turned into a message in a
  worker process within limits, or a stand-in when it cannot be (issue 13);
- ``smtp``: threaded replies out; ``check``: ``omniroute check`` for the channel.
"""

from connectors.email.batch import cursor_key, pool_settings
from connectors.email.check import check
from connectors.email.imap import KEYWORD, ImapSession
from connectors.email.intake import EmailConnector
from connectors.email.smtp import SmtpSender, reply_subject

__all__ = [
    "KEYWORD",
    "EmailConnector",
    "ImapSession",
    "SmtpSender",
    "check",
    "cursor_key",
    "pool_settings",
    "reply_subject",
]
