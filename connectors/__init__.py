"""One package per channel (``email``, ``twilio``, ``twitter``; ``pbx`` is one module),
the lease loop the pollers share (``leasing``), and the HTTP app that hosts the webhooks,
health and metrics (``http``, ``http_limits``). Depends only on ``ingest``; a disabled
channel's package (and its third-party library) is never imported (``config.registry``)."""
