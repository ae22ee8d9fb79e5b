"""One module per channel (email, twilio, pbx, twitter), with the parts a channel grew into
beside it (``mime`` for email; ``twitter_api``, ``twitter_messages``, ``twitter_sender`` for
X), the lease loop the pollers share (``leasing``), and the HTTP app that hosts the
webhooks, health and metrics. Depends only on ``ingest``; a disabled connector's module
(and its third-party library) is never imported."""
