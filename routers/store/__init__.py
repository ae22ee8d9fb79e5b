"""The directory database's plumbing, beneath the routing: opening the engine and migrating
(``engine``), portable SQL (``sql``), one transaction per unit of sync work
(``transactions``), the connectors' cursors and seen ids (``connector_state``), leases
(``lease``), the bounded log of routed messages and sent replies (``routed_log``) and its
pruning (``maintenance``). Of ``routers`` it imports only ``models`` and
``settings``: the routing uses it, never the other way."""
