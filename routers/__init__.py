"""The customer directory, routing state, the routing policy, the router worker and the
outbound dispatcher. Depends only on ``ingest``."""
