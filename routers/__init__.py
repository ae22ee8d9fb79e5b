"""The routing: the customer directory, routing state, the routing policy and decider, the
router worker and the outbound dispatcher. Database plumbing is ``routers.store``, the
directory's CSV import and export ``routers.csv``. Depends only on ``ingest``."""
