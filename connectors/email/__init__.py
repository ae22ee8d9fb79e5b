"""The email channel: IMAP mailboxes in (aioimaplib), replies out (aiosmtplib).

- ``imap``: one IMAP connection whose every command has a deadline;
- ``intake``: a supervised worker per mailbox (leases, reconnects, reload);
- ``batch``: what is taken from a mailbox, flagged and never lost (its invariants);
- ``scan``, ``parse_pool``, ``parse_worker``, ``mime``, ``body``: a mail turned into a
  message in a worker process within limits, or a stand-in when it cannot be (issue 13);
- ``smtp``: threaded replies out; ``check``: ``omniroute check`` for the channel.

Nothing is imported here: a parse worker (``-m connectors.email.parse_worker``) must not
load the IMAP and SMTP clients it never uses.
"""
