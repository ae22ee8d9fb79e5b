"""The batch publish of the IMAP intake (``MailIntake._publish`` through
``InboundBatchSink.submit_many``) when the bus cannot publish at all: a real Dovecot, the
real ``BusSink`` on a ``Bus`` that is not open (the daemon starts its pollers before the
broker answers, ``config.daemon._serve``), a real directory.

The batch's failure must be the one every failed publish gets (batch.py's invariants):
the mails left unflagged, their seen-store records forgotten, ``email.batch_incomplete``
logged, and ``submit_many`` saying so per message instead of raising (its protocol)."""

import pytest
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from connectors.email.intake import EmailConnector
from connectors.settings import EmailSettings
from ingest.bus import Bus
from ingest.errors import TransientError
from ingest.health import Health
from ingest.schema import Identity, InboundMessage
from ingest.settings import BusSettings
from ingest.sink import BusSink
from routers.store.connector_state import DbCursorStore, DbSeenStore
from tests.email.test_email_imap import mailbox
from tests.support.mail import Dovecot, make_mail


def _unopened_bus() -> Bus:
    """A bus as the daemon holds it before ``Bus.open`` succeeded (or after ``close``)."""
    return Bus("amqp://guest:guest@127.0.0.1:1/", BusSettings(), name="test-unopened")


async def test_bus_sink_submit_many_on_a_bus_not_open_fails_each_message() -> None:
    """One outcome a message, as ``InboundBatchSink.submit_many`` promises: the batch
    publish must not raise where ``submit`` failed each message on its own."""
    messages = [
        InboundMessage(
            channel="email",
            external_id=f"closed{n}@customer.example",
            sender=Identity(kind="email", address="ayse@customer.example"),
        )
        for n in range(2)
    ]
    outcomes = await BusSink(_unopened_bus()).submit_many(messages)
    assert len(outcomes) == 2
    assert all(isinstance(o, TransientError) for o in outcomes), outcomes


async def test_a_batch_the_bus_cannot_publish_is_forgotten_and_logged(
    dovecot: Dovecot, engine: AsyncEngine
) -> None:
    """Before 8cd39ba each mail's ``submit`` raised "bus is not open" into the batch's
    gather: the mails were forgotten in the seen store and ``email.batch_incomplete``
    logged. Through ``submit_many`` the error escapes ``_submit_batch``: the records of a
    batch never published stay, and the warning is never written."""
    ids = ["closed0@customer.example", "closed1@customer.example"]
    for external_id in ids:
        dovecot.append(make_mail(external_id))
    seen = DbSeenStore(engine)
    connector = EmailConnector(
        EmailSettings(mailboxes=[mailbox(dovecot)]),
        sink=BusSink(_unopened_bus()),
        cursors=DbCursorStore(engine),
        seen=seen,
        health=Health(),
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(TransientError, match="not open"):
        await connector.drain()

    assert all("$Omniroute" not in f for f in dovecot.flags().values())  # never safe: unflagged
    events = [e for e in logs if e["event"] == "email.batch_incomplete"]
    assert [e["uid"] for e in events] == [1], [e["event"] for e in logs]
    # forgotten: recording them again finds both new, as for any failed publish
    assert await seen.first_time_many("email", ids) == set(ids)
