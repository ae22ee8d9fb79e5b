"""Taking what is new in one mailbox, batch by batch (issue 4, issue 13).

Invariants:
- A mail is flagged ``\\Seen $Omniroute`` (or moved) only after ``sink.submit_many`` said
  it is safe, that is after the broker confirmed it; the cursor (UIDVALIDITY and the last
  UID taken, per mailbox in the ``CursorStore``) moves only after that. What is new is
  ``UID SEARCH UID last+1:*``, never UNSEEN, so a person reading the mailbox in webmail
  does not make mail vanish (mail already flagged ``$Omniroute`` is left out). A changed
  UIDVALIDITY rescans everything not flagged ``$Omniroute`` (or, with ``after = move:…``,
  everything still in the folder).
- Intake works per batch of ``batch_size`` mails: one seen-store transaction for the
  batch's slots and one for its Message-IDs, the new mails published concurrently, one
  ``UID STORE`` for what the broker confirmed, one cursor write. When a publish fails, the
  mails confirmed are flagged anyway, the failed ones are forgotten and left unflagged,
  and the cursor stops just before the first of them.
- Batches overlap, in order: batch n+1 is fetched, parsed in the parse pool and recorded
  in the seen store while batch n is published, and batch n is flagged and its cursor
  written while batch n+1 is published (each batch's flags and cursor after the one
  before it). A batch recorded but never published (one before it failed) is published
  by the next pass: its slots say it was never confirmed. A mail that cannot be parsed
  within its limits (or is over ``max_message_bytes``, of which only the head is fetched)
  is routed as a stand-in, never dropped and never fetched again.
- Copies are dropped by Message-ID (a content hash when there is none) in the
  ``SeenStore``. Each (mailbox, UIDVALIDITY, UID) slot is also recorded, so a mail whose
  Message-ID was recorded by a run killed before the broker confirmed it is submitted
  again rather than lost: at-least-once, with a duplicate only in that window.
"""

import asyncio
import contextlib
import json
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import structlog

from connectors.email.ending import abandon, wind_down
from connectors.email.imap import KEYWORD, ImapSession
from connectors.email.parse_pool import ParsePool
from connectors.email.parsed import (
    SEEN_CHANNEL,
    SLOT_CHANNEL,
    Mail,
    parse_batch,
    pool_settings,
    record,
)
from connectors.email.scan import SCAN_HEAD
from connectors.settings import EmailSettings, MailboxSettings
from ingest.errors import TransientError
from ingest.identities import redact
from ingest.protocols import CursorStore, InboundBatchSink, SeenStore

log = structlog.get_logger("omniroute.email")


#: confirmed publishes one mailbox worker awaits at once (a wider batch goes in slices)
PUBLISH_CONCURRENCY = 100
#: bodies of one batch; at most three batches' bodies are held at once (``_fetch_ahead``)
BATCH_BYTES = 16 * 1024 * 1024
#: batches publishing at once in one mailbox worker, each settling after the one before
SETTLING = 2


def cursor_key(mailbox: str) -> str:
    return "imap:" + mailbox


@dataclass
class _Cursor:
    uidvalidity: int
    last_uid: int


#: what the fetching task hands the taker: a batch and its parse, the end, or its error
_Ahead = tuple[list[int], "asyncio.Task[list[Mail]]"] | None | Exception


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
        sink: InboundBatchSink,
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
        """Take ``uids`` batch by batch, in order: a task of its own fetches the next batch
        and has it parsed and recorded (``_fetch_ahead``) while this one publishes, and
        each batch settles (``_settle``: its confirms, then its flags and cursor after the
        batch before it) in a task of its own, two batches at once: both cores parse while
        the loop talks to the broker, and no step waits for IMAP, the directory or the
        broker when another can go on."""
        taken = 0
        ready: asyncio.Queue[_Ahead] = asyncio.Queue(maxsize=1)
        fetching = asyncio.create_task(
            self._fetch_ahead(box, session, uids, ready), name="email-fetch:" + box.name
        )
        settling: deque[asyncio.Task[int]] = deque()
        doomed = False  # a batch failed: the ones after it cannot be flagged
        try:
            while (item := await ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                batch, parsing = item
                mails = await parsing
                if len(settling) >= SETTLING:
                    doomed = True
                    taken += await settling.popleft()
                    doomed = False
                before = settling[-1] if settling else None
                settling.append(
                    asyncio.create_task(
                        self._settle(box, session, batch, mails, cursor, before),
                        name="email-settle:" + box.name,
                    )
                )
            while settling:
                doomed = True
                taken += await settling.popleft()
                doomed = False
        finally:
            # a failed batch dooms the ones after it (its records make the next pass
            # publish them); otherwise what the broker confirmed is still flagged if IMAP
            # answers, and what is not is published again by the next pass (never lost)
            await wind_down(fetching, ready, settling, stop=doomed)
        return taken

    async def _fetch_ahead(
        self,
        box: MailboxSettings,
        session: ImapSession,
        uids: list[int],
        ready: "asyncio.Queue[_Ahead]",
    ) -> None:
        """Fetch batch after batch and start its parse, one batch ahead of the one waiting
        to be taken (so at most three batches' bodies are held: ``_batches`` bounds each);
        None after the last, or the error that stopped it."""
        parsing: asyncio.Task[list[Mail]] | None = None
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
                await ready.put((batch, parsing))
                parsing = None
            await ready.put(None)
        except Exception as exc:  # the taker raises it once the batches before it are taken
            await ready.put(exc)
        finally:
            if parsing is not None and await abandon(parsing):
                raise asyncio.CancelledError

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

    async def _settle(
        self,
        box: MailboxSettings,
        session: ImapSession,
        uids: list[int],
        mails: list[Mail],
        cursor: _Cursor,
        before: "asyncio.Task[int] | None",
    ) -> int:
        """Publish one parsed and recorded batch's new mails concurrently, then, once the
        batch before it settled (its failure is this one's: the cursor never passes a batch
        not flagged), flag in one ``UID STORE`` what the broker confirmed (and the copies)
        and move the cursor once. Returns how many were published.

        When a publish fails, the mails confirmed are still flagged, the failed ones are
        forgotten and left unflagged, the cursor stops just before the first of them, and
        the first error is raised."""
        outcome = await self._submit_batch(box, mails)
        if before is not None:
            await before
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
    ) -> list[Mail]:
        mails = await parse_batch(self._pool, self._settings, box, uidvalidity, fetched, too_large)
        await record(self._seen, mails)
        return mails

    async def _submit_batch(self, box: MailboxSettings, mails: list[Mail]) -> BatchOutcome:
        """Publish what is new in a recorded batch concurrently, and undo the records of
        what could not be published."""
        if not mails:
            return BatchOutcome()
        done: list[int] = []
        outgoing: list[Mail] = []
        for mail in mails:
            if mail.new_slot and not mail.new_id:
                log.info(
                    "email.duplicate", mailbox=box.name, uid=mail.uid, message_id=mail.message.id
                )
                done.append(mail.uid)
            else:
                # new, or recorded by a run that may have died before the broker confirmed
                outgoing.append(mail)
        results: list[BaseException | None] = []
        for start in range(0, len(outgoing), PUBLISH_CONCURRENCY):
            results += await self._publish(outgoing[start : start + PUBLISH_CONCURRENCY])
        failed: list[tuple[Mail, BaseException]] = []
        for mail, result in zip(outgoing, results, strict=True):
            if result is None:
                done.append(mail.uid)
                log.info(
                    "email.taken",
                    mailbox=box.name,
                    uid=mail.uid,
                    message_id=mail.message.id,
                    sender=redact(mail.message.sender.address),
                    again=not mail.new_id,
                )
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

    async def _publish(self, mails: list[Mail]) -> list[BaseException | None]:
        """Confirmed publishes of the mails, sent together: one outcome a mail (None:
        confirmed). The sink bounds the wait (``bus.publish_timeout``), and a confirm that
        came in time counts even if others did not; a sink that fails the batch whole fails
        each of its mails."""
        try:
            return await self._sink.submit_many([mail.message for mail in mails])
        except Exception as exc:
            return [exc] * len(mails)
