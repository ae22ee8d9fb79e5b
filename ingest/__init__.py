"""The shared ground of omniroute: the message schema, identities and the RabbitMQ bus.

Everything else (connectors, routers, config) depends on this package; it depends on
nothing of omniroute's own.
"""
