"""The composition root: settings, logging, the command line and the daemon. Only the
entry points import this package; it wires ``ingest``, ``routers`` and ``connectors``."""
