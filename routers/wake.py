"""Waking the timer workers (issue 16) from whichever process wrote a near due time: on
PostgreSQL a ``NOTIFY omniroute_timers`` in the writing transaction, delivered at commit to
every instance's LISTENing worker (``routers.timers``). Kept apart from the workers so the
writers (the routing state, the router's claim) need not import them.
"""

from datetime import timedelta

from sqlalchemy import Connection, text

#: a due time nearer than this when written wakes the timer workers (their longest sleep)
SOON = timedelta(seconds=30)
#: the PostgreSQL channel on which a process says "a timer is due sooner than you think"
CHANNEL = "omniroute_timers"
_NOTIFY = text(f"SELECT pg_notify('{CHANNEL}', '')")


def notify(connection: Connection) -> None:
    """Wake every instance's timer workers when this transaction commits (PostgreSQL; on
    SQLite the writer's own process is the only one, and it nudges its worker)."""
    if connection.dialect.name == "postgresql":
        connection.execute(_NOTIFY)
