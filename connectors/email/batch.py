"""Taking what is new in one mailbox, batch by batch (issue 4, issue 13).

Invariants:
- A mail is flagged ``\\Seen $Omniroute`` (or moved) only after ``sink.submit`` returned,
  that is after the broker confirmed it; the cursor (UIDVALIDITY and the last UID taken,
  per mailbox in the ``CursorStore``) moves only after that. What is new is
  ``UID SEARCH UID last+1:*``, never UNSEEN, so a person reading the mailbox in webmail
  does not make mail vanish (mail already flagged ``$Omniroute`` is left out). A changed
  UIDVALIDITY rescans everything not flagged ``$Omniroute`` (or, with ``after = move:…``,
  everything still in the folder).
- Intake works per batch of ``batch_size`` mails: one seen-store transaction for the
  batch's slots and one for its Message-IDs, the new mails published concurrently, one
  ``UID STORE`` for what the broker confirmed, one cursor write. When a publish fails, the
  mails confirmed are flagged anyway, the failed ones are forgotten and left unflagged,
  and the cursor stops just before the first of them.
- Every mail is parsed in the parse pool while the batch before it is published; a mail
  that cannot be parsed within its limits (or is over ``max_message_bytes``, of which only
  the head is fetched) is routed as a stand-in, never dropped and never fetched again.
- Copies are dropped by Message-ID (a content hash when there is none) in the
  ``SeenStore``. Each (mailbox, UIDVALIDITY, UID) slot is also recorded, so a mail whose
  Message-ID was recorded by a run killed before the broker confirmed it is submitted
  again rather than lost: at-least-once, with a duplicate only in that window.
"""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from connectors.email.imap import KEYWORD, ImapSession
from connectors.email.mime import stand_in
from connectors.email.parse_pool import ParseFailed, ParsePool, PoolSettings
from connectors.email.scan import SCAN_HEAD, Limits
from connectors.settings import EmailSettings, MailboxSettings
from ingest.errors import TransientError
from ingest.identities import redact
from ingest.protocols import CursorStore, InboundSink, SeenStore
from ingest.schema import InboundMessage

log = structlog.get_logger("omniroute.email")

SEEN_CHANNEL = "email"
SLOT_CHANNEL = "email.slot"
#: confirmed publishes one mailbox worker awaits at once (the rest of a wider batch waits)
PUBLISH_CONCURRENCY = 100
#: bodies of one batch; two batches are held at once (one parsed, one published)
BATCH_BYTES = 16 * 1024 * 1024


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


def cursor_key(mailbox: str) -> str:
    return "imap:" + mailbox


@dataclass
class _Cursor:
    uidvalidity: int
    last_uid: int


@dataclass
class _Mail:
    """One parsed mail of a batch and what the seen store said about it."""

    uid: int
    slot: str
    message: InboundMessage
    new_slot: bool = False
    new_id: bool = False


@dataclass
class BatchOutcome:
    """What publishing one batch came to: the UIDs safe to flag (confirmed, or copies of
    a mail already taken), how many were published, and the first failure, if any."""

    done: list[int] = field(default_factory=list)
    published: int = 0
    failed_uid: int | None = None
    error: Exception | None = None


class MailIntake:
    """Drains one mailbox session into the sink; owns the parse pool the mailboxes share."""

    def __init__(
        self,
        settings: EmailSettings,
        *,
        sink: InboundSink,
        cursors: CursorStore,
        seen: SeenStore,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._cursors = cursors
        self._seen = seen
        self._pool = ParsePool(pool_settings(settings))

    async def reconfigure(self, settings: EmailSettings) -> None:
        """New parse limits take the next mail; the old pool finishes what it holds."""
        if pool_settings(settings) != pool_settings(self._settings):
            retired, self._pool = self._pool, ParsePool(pool_settings(settings))
            await retired.close(drain=settings.parse_timeout * 2 + 1)
            log.info("email.parse_pool_replaced", workers=settings.parse_workers)
        self._settings = settings

    async def close(self) -> None:
        """End the parse workers; the next mail starts new ones."""
        retired, self._pool = self._pool, ParsePool(pool_settings(self._settings))
        await retired.close()

    async def _load_cursor(self, box: MailboxSettings) -> _Cursor | None:
        text = await self._cursors.get(cursor_key(box.name))
        if not text:
            return None
        try:
            data = json.loads(text)
            return _Cursor(int(data["uidvalidity"]), int(data["last_uid"]))
        except (ValueError, KeyError, TypeError):
            log.warning("email.cursor_unreadable", mailbox=box.name)
            return None

    async def _save_cursor(self, box: MailboxSettings, cursor: _Cursor) -> None:
        value = json.dumps({"uidvalidity": cursor.uidvalidity, "last_uid": cursor.last_uid})
        await self._cursors.set(cursor_key(box.name), value)

    async def drain(self, box: MailboxSettings, session: ImapSession) -> int:
        """Take everything new, batch by batch, until a search finds nothing more."""
        taken = 0
        cursor = await self._load_cursor(box)
        if cursor is None or cursor.uidvalidity != session.uidvalidity:
            if cursor is not None:
                log.warning(
                    "email.uidvalidity_changed",
                    mailbox=box.name,
                    was=cursor.uidvalidity,
                    now=session.uidvalidity,
                )
            # rescan: rely on the keyword (or on the folder, when taken mail is moved away)
            criteria = ("ALL",) if box.after.startswith("move:") else ("UNKEYWORD", KEYWORD)
            uids = await session.search(*criteria)
            cursor = _Cursor(session.uidvalidity, 0)
            floor = max(session.uidnext - 1, 0)
            taken += await self._take_all(box, session, uids, cursor)
            cursor.last_uid = max(cursor.last_uid, floor)
            await self._save_cursor(box, cursor)
        # mail already flagged is taken: a batch that failed half way confirmed some mails
        # past the one it stopped at, and those are not published again
        unflagged = () if box.after.startswith("move:") else ("UNKEYWORD", KEYWORD)
        while True:
            found = await session.search("UID", f"{cursor.last_uid + 1}:*", *unflagged)
            uids = [u for u in found if u > cursor.last_uid]  # "n:*" always names the last
            if not uids:
                return taken
            taken += await self._take_all(box, session, uids, cursor)

    async def _take_all(
        self, box: MailboxSettings, session: ImapSession, uids: list[int], cursor: _Cursor
    ) -> int:
        """Take ``uids`` batch by batch, each parsed in the pool while the one before it is
        published and flagged: both cores parse while the loop talks to the broker. At
        most two batches' bodies are held at once (``_batches`` bounds each)."""
        taken = 0
        ahead: tuple[list[int], asyncio.Task[list[_Mail]]] | None = None
        try:
            async for batch, sizes in self._batches(box, session, uids):
                limit = self._settings.max_message_bytes
                too_large = {uid: size for uid, size in sizes.items() if size > limit}
                fetched = await session.fetch([u for u in batch if u not in too_large])
                # a mail past max_message_bytes is never held whole: its head is enough
                # for a stand-in that keeps sender, Subject and Message-ID (issue 13)
                fetched += await session.fetch(sorted(too_large), first=SCAN_HEAD)
                fetched.sort(key=lambda item: item[0])
                if len(fetched) < len(batch):
                    log.info("email.vanished", mailbox=box.name, missing=len(batch) - len(fetched))
                parsing = asyncio.create_task(
                    self._parse_batch(box, session.uidvalidity, fetched, too_large)
                )
                del fetched  # the raw bodies live on in the parse task only
                previous, ahead = ahead, (batch, parsing)
                if previous is not None:
                    taken += await self._take_batch(box, session, *previous, cursor)
            if ahead is not None:
                previous, ahead = ahead, None
                taken += await self._take_batch(box, session, *previous, cursor)
        finally:
            if ahead is not None:
                # a batch before it failed (or we are cancelled): this one is taken next pass
                ahead[1].cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await ahead[1]
        return taken

    async def _batches(
        self, box: MailboxSettings, session: ImapSession, uids: list[int]
    ) -> AsyncIterator[tuple[list[int], dict[int, int]]]:
        """Batches of ``batch_size`` mails and at most ``BATCH_BYTES`` of bodies (a single
        larger mail goes alone), so memory stays bounded whatever waits."""
        for start in range(0, len(uids), box.batch_size):
            candidates = uids[start : start + box.batch_size]
            sizes = await session.sizes(candidates)
            batch: list[int] = []
            held = 0
            for uid in candidates:
                size = min(sizes.get(uid, 0), self._settings.max_message_bytes)
                if batch and held + size > BATCH_BYTES:
                    yield batch, {u: sizes.get(u, 0) for u in batch}
                    batch, held = [], 0
                batch.append(uid)
                held += size
            if batch:
                yield batch, {u: sizes.get(u, 0) for u in batch}

    async def _take_batch(
        self,
        box: MailboxSettings,
        session: ImapSession,
        uids: list[int],
        parsing: "asyncio.Task[list[_Mail]]",
        cursor: _Cursor,
    ) -> int:
        """Record one parsed batch's ids in one transaction, publish the new mails
        concurrently, then flag in one ``UID STORE`` what the broker confirmed (and the
        copies) and move the cursor once.

        When a publish fails, the mails confirmed are still
        flagged, the failed ones are forgotten and left unflagged, the cursor stops just
        before the first of them, and the first error is raised."""
        mails = await parsing
        outcome = await self._submit_batch(box, mails)
        stuck, error = outcome.failed_uid, outcome.error
        if stuck is None or error is None:
            if outcome.done:
                await session.mark(outcome.done)
            cursor.last_uid = max(cursor.last_uid, uids[-1])
            await self._save_cursor(box, cursor)
            return outcome.published
        log.warning("email.batch_incomplete", mailbox=box.name, uid=stuck, error=repr(error))
        with contextlib.suppress(TransientError):  # best effort: what is safe is not taken again
            if outcome.done:
                await session.mark(outcome.done)
            if stuck - 1 > cursor.last_uid:
                cursor.last_uid = stuck - 1
                await self._save_cursor(box, cursor)
        raise error

    async def _parse_batch(
        self,
        box: MailboxSettings,
        uidvalidity: int,
        fetched: list[tuple[int, bytes]],
        too_large: dict[int, int],
    ) -> list[_Mail]:
        """The batch's mails in UID order, parsed concurrently in the parse pool; a mail
        that trips a limit or fails the parser becomes a ``stand_in`` that keeps what a
        bounded header scan reads (issue 13), and is taken like any other."""
        recipient = box.address or (box.username if "@" in box.username else None)

        async def one(uid: int, raw: bytes) -> _Mail:
            locator = {
                "mailbox": box.name,
                "folder": box.folder,
                "uidvalidity": uidvalidity,
                "uid": uid,
            }
            try:
                if uid in too_large:
                    limit = self._settings.max_message_bytes
                    raise ParseFailed(
                        "too_large", f"too_large: {too_large[uid]} bytes, over {limit}"
                    )
                message = await self._pool.parse(
                    raw,
                    mailbox=box.name,
                    recipient=recipient,
                    inline_max=self._settings.inline_attachment_max,
                    locator=locator,
                    trusted_authserv_ids=self._settings.trusted_authserv_ids,
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
            return _Mail(uid, f"{box.name}:{uidvalidity}:{uid}", message)

        results = await asyncio.gather(
            *(one(uid, raw) for uid, raw in fetched), return_exceptions=True
        )
        mails: list[_Mail] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the pool could not start a worker: the batch waits
            mails.append(result)
        return mails

    async def _submit_batch(self, box: MailboxSettings, mails: list[_Mail]) -> BatchOutcome:
        """Record the batch's slots and Message-IDs (one transaction each), publish what is
        new concurrently, and undo the records of what could not be published."""
        if not mails:
            return BatchOutcome()
        new_slots = await self._seen.first_time_many(SLOT_CHANNEL, [m.slot for m in mails])
        new_ids = await self._seen.first_time_many(
            SEEN_CHANNEL, [m.message.external_id for m in mails]
        )
        done: list[int] = []
        outgoing: list[_Mail] = []
        claimed: set[str] = set()  # a Message-ID twice in one batch: the first UID owns it
        for mail in mails:
            external_id = mail.message.external_id
            mail.new_slot = mail.slot in new_slots
            mail.new_id = external_id in new_ids and external_id not in claimed
            if mail.new_id:
                claimed.add(external_id)
            if mail.new_slot and not mail.new_id:
                log.info(
                    "email.duplicate", mailbox=box.name, uid=mail.uid, message_id=mail.message.id
                )
                done.append(mail.uid)
            else:
                # new, or recorded by a run that may have died before the broker confirmed
                outgoing.append(mail)
        limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)
        results = await asyncio.gather(
            *(self._publish(box, mail, limit) for mail in outgoing), return_exceptions=True
        )
        failed: list[tuple[_Mail, BaseException]] = []
        for mail, result in zip(outgoing, results, strict=True):
            if result is None:
                done.append(mail.uid)
            else:
                failed.append((mail, result))
        if not failed:
            return BatchOutcome(sorted(done), len(outgoing))
        # forget only what this attempt recorded: a slot recorded by an earlier run stays,
        # so the mail is submitted again rather than taken for a copy of itself
        with contextlib.suppress(TransientError):
            await self._seen.forget_many(
                SEEN_CHANNEL, [m.message.external_id for m, _ in failed if m.new_id]
            )
            await self._seen.forget_many(SLOT_CHANNEL, [m.slot for m, _ in failed if m.new_slot])
        mail, exc = failed[0]
        if not isinstance(exc, Exception):  # a publish cancelled on its own, not this task
            exc = TransientError(f"publish of UID {mail.uid} cancelled")
        return BatchOutcome(sorted(done), len(outgoing) - len(failed), mail.uid, exc)

    async def _publish(self, box: MailboxSettings, mail: _Mail, limit: asyncio.Semaphore) -> None:
        """One confirmed publish under the mailbox deadline (a task of its own: the log
        context bound here stays in it)."""
        structlog.contextvars.bind_contextvars(message_id=mail.message.id)
        async with limit:
            try:
                async with asyncio.timeout(box.timeout):
                    await self._sink.submit(mail.message)
            except TimeoutError as exc:
                raise TransientError(f"publish not confirmed within {box.timeout} s") from exc
        log.info(
            "email.taken",
            mailbox=box.name,
            uid=mail.uid,
            sender=redact(mail.message.sender.address),
            again=not mail.new_id,
        )
