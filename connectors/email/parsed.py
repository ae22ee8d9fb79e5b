"""One fetched batch of a mailbox, parsed and recorded (issue 13, issue 18).

Sole purpose: the step of ``connectors.email.batch`` that runs ahead of publishing, in the
task that fetches. Every mail is parsed in the parse pool; a mail that cannot be parsed
within its limits (or is over ``max_message_bytes``, of which only the head was fetched)
becomes a stand-in, never dropped. Each (mailbox, UIDVALIDITY, UID) slot and each
Message-ID is then recorded in the ``SeenStore``, which says of each mail whether this
attempt recorded it first.
"""

import asyncio
from dataclasses import dataclass

import structlog

from connectors.email.mime import stand_in
from connectors.email.parse_pool import ParseFailed, ParsePool, PoolSettings
from connectors.email.scan import Limits
from connectors.settings import EmailSettings, MailboxSettings
from ingest.protocols import SeenStore
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.email")

SEEN_CHANNEL = "email"
SLOT_CHANNEL = "email.slot"


def pool_settings(settings: EmailSettings) -> PoolSettings:
    return PoolSettings(
        workers=settings.parse_workers,
        memory=settings.parse_memory,
        timeout=settings.parse_timeout,
        limits=Limits(
            max_header_bytes=settings.max_header_bytes,
            max_encoded_words=settings.max_encoded_words,
            max_mime_depth=settings.max_mime_depth,
            max_parts=settings.max_parts,
        ),
    )


@dataclass
class Mail:
    """One parsed mail of a batch and what the seen store said about it."""

    uid: int
    slot: str
    message: InboundMessage
    new_slot: bool = False
    new_id: bool = False


async def parse_batch(
    pool: ParsePool,
    settings: EmailSettings,
    box: MailboxSettings,
    uidvalidity: int,
    fetched: list[tuple[int, bytes]],
    too_large: dict[int, int],
) -> list[Mail]:
    """The batch's mails in UID order, parsed concurrently in the parse pool; a mail
    that trips a limit or fails the parser becomes a ``stand_in`` that keeps what a
    bounded header scan reads (issue 13), and is taken like any other."""
    recipient = box.address or (box.username if "@" in box.username else None)

    async def one(uid: int, raw: bytes) -> Mail:
        locator = {
            "mailbox": box.name,
            "folder": box.folder,
            "uidvalidity": uidvalidity,
            "uid": uid,
        }
        try:
            if uid in too_large:
                limit = settings.max_message_bytes
                raise ParseFailed("too_large", f"too_large: {too_large[uid]} bytes, over {limit}")
            message = await pool.parse(
                raw,
                mailbox=box.name,
                recipient=recipient,
                inline_max=settings.inline_attachment_max,
                locator=locator,
                trusted_authserv_ids=settings.trusted_authserv_ids,
            )
        except ParseFailed as exc:
            log.warning(
                "email.parse_failed",
                mailbox=box.name,
                uid=uid,
                reason=exc.reason,
                size=len(raw),
                error=exc.detail[:300],
            )
            # off the loop: a digest of a mail of tens of MiB takes tens of ms
            message = await asyncio.to_thread(
                stand_in,
                raw,
                mailbox=box.name,
                recipient=recipient,
                locator=locator,
                reason=exc.reason,
                detail=exc.detail,
                size=too_large.get(uid),
            )
        if box.team:
            message.meta["address_team"] = box.team
        return Mail(uid, f"{box.name}:{uidvalidity}:{uid}", message)

    results = await asyncio.gather(*(one(uid, raw) for uid, raw in fetched), return_exceptions=True)
    mails: list[Mail] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result  # the pool could not start a worker: the batch waits
        mails.append(result)
    return mails


async def record(seen: SeenStore, mails: list[Mail]) -> None:
    """Record the batch's slots and Message-IDs (one transaction each) and say of each
    mail whether this attempt recorded them first."""
    if not mails:
        return
    new_slots = await seen.first_time_many(SLOT_CHANNEL, [m.slot for m in mails])
    new_ids = await seen.first_time_many(SEEN_CHANNEL, [m.message.external_id for m in mails])
    claimed: set[str] = set()  # a Message-ID twice in one batch: the first UID owns it
    for mail in mails:
        external_id = mail.message.external_id
        mail.new_slot = mail.slot in new_slots
        mail.new_id = external_id in new_ids and external_id not in claimed
        if mail.new_id:
            claimed.add(external_id)
