"""One module per channel (email, twilio, pbx, twitter) and the HTTP app that hosts the
webhooks, health and metrics. Depends only on ``ingest``; a disabled connector's module
(and its third-party library) is never imported."""
