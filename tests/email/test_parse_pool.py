"""Bounded parsing (issue 13): every hostile class is refused cheaply or contained in a
worker process; the daemon's own memory and loop are never what pays."""

import asyncio
import os
import resource
import time

import pytest

from connectors.email.batch import pool_settings
from connectors.email.mime import stand_in
from connectors.email.parse_pool import ParseFailed, ParsePool
from connectors.email.scan import Limits, precheck, scan_head
from connectors.settings import EmailSettings
from tests import hostile_mail
from tests.hostile_mail import SENDER, every_class, good
from tests.support.waiting import until

KWARGS = {
    "mailbox": "support",
    "recipient": "support@omniroute.test",
    "inline_max": 64 * 1024,
    "locator": {"uid": 1},
}
DEFAULT_LIMITS = pool_settings(EmailSettings()).limits
#: a mail that takes seconds of CPU in the stdlib parser, past every pre-check at 1 MiB
SLOW = hostile_mail.punycode_subject("slow", 450_000)
REASONS = {
    "header_too_large",
    "too_many_encoded_words",
    "too_deep",
    "too_many_parts",
    "parse_timeout",
    "parse_memory",
    "parser_error",
    "parser_crashed",
}


async def _outcome(pool: ParsePool, raw: bytes) -> str:
    """The parsed message's sender, or the reason the pool gave."""
    try:
        message = await pool.parse(raw, **KWARGS)
    except ParseFailed as exc:
        return exc.reason
    return message.sender.address


def test_default_prechecks_refuse_the_floods_and_pass_real_mail() -> None:
    """The issue's attacks are refused before the stdlib parser sees them."""
    expected = {
        "ew-85k": "too_many_encoded_words",
        "ew-986k": "header_too_large",
        "nest-900": "too_deep",
        "nest-5000": "too_deep",
        "parts-5000": "too_many_parts",
        "addresses-20k": "header_too_large",
        "header-600k": "header_too_large",
    }
    for tag, raw in every_class():
        found = precheck(raw, DEFAULT_LIMITS)
        assert (found or "").split(":")[0] == expected.get(tag, ""), tag
    assert precheck(good("g"), DEFAULT_LIMITS) is None


def test_prechecks_count_structure_not_text() -> None:
    """Body lines that merely start with ``--`` and sibling parts are not nesting."""
    signature = good("sig").replace(b"gelmedi.", b"gelmedi.\r\n-- \r\n--b0\r\n--\r\n" * 50)
    assert precheck(signature, DEFAULT_LIMITS) is None
    siblings = hostile_mail.many_parts("siblings", 900)
    assert precheck(siblings, DEFAULT_LIMITS) is None
    assert precheck(hostile_mail.nested_multipart("n", 20), DEFAULT_LIMITS) is None
    assert precheck(hostile_mail.nested_multipart("n", 21), DEFAULT_LIMITS) is not None


@pytest.mark.parametrize(("tag", "raw"), every_class(), ids=[t for t, _ in every_class()])
def test_the_header_scan_keeps_sender_id_and_subject_of_every_hostile_class(
    tag: str, raw: bytes
) -> None:
    """What a stand-in keeps is read in bounded time, whatever the mail."""
    started = time.process_time()
    head = scan_head(raw)
    assert time.process_time() - started < 0.5
    assert head.sender == SENDER
    assert head.message_id is None or len(head.message_id) <= 998
    if tag != "huge-ids":
        assert head.message_id == f"{tag}@attacker.example"
    assert head.subject
    assert len(head.subject) <= 998


async def test_every_hostile_class_ends_as_a_message_or_a_reason_within_its_limits() -> None:
    """No mail makes ``parse`` hang or raise anything but ``ParseFailed``, and the daemon
    side's memory does not grow with what the workers are made to parse."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with ParsePool(pool_settings(EmailSettings(parse_timeout=2))) as pool:
        for tag, raw in every_class():
            started = time.monotonic()
            outcome = await _outcome(pool, raw)
            assert outcome in REASONS | {SENDER}, (tag, outcome)
            assert time.monotonic() - started < 6, tag
        ok = await pool.parse(good("after"), **KWARGS)
        assert ok.subject == "after"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < 100 * 1024, f"the test process grew {grown // 1024} MiB"


async def test_a_mail_past_the_cpu_limit_is_cut_off_and_the_worker_replaced() -> None:
    """One punycode word no pre-check refuses at these limits (the stdlib decodes it in
    quadratic time, 7.5 s here): the worker's CPU limit is what ends the parse."""
    wide = EmailSettings(max_header_bytes=1024 * 1024, parse_timeout=1, parse_workers=1)
    async with ParsePool(pool_settings(wide)) as pool:
        started = time.monotonic()
        with pytest.raises(ParseFailed) as failed:
            await pool.parse(SLOW, **KWARGS)
        assert failed.value.reason == "parse_timeout"
        assert time.monotonic() - started < 4
        assert pool.replaced == 1
        assert (await pool.parse(good("next"), **KWARGS)).subject == "next"


async def test_a_mail_past_the_memory_limit_does_not_reach_the_daemon() -> None:
    """A worker's address space is capped: the encoded-word flood that took 23 GB is
    parsed within 64 MiB (the header falls back to a plain decode) or refused."""
    wide = Limits(
        max_header_bytes=4 * 1024 * 1024,
        max_encoded_words=10**7,
        max_mime_depth=20,
        max_parts=1000,
    )
    settings = pool_settings(EmailSettings(parse_memory=64 * 1024 * 1024, parse_timeout=3))
    settings = type(settings)(workers=1, memory=settings.memory, timeout=3, limits=wide)
    async with ParsePool(settings) as pool:
        outcome = await _outcome(pool, hostile_mail.encoded_word_flood("m", 986_000))
        assert outcome in {"parse_memory", "parse_timeout", "parser_crashed", SENDER}
        assert (await pool.parse(good("next"), **KWARGS)).subject == "next"


async def test_a_killed_worker_is_retried_once_then_a_crash_of_that_mail_only() -> None:
    """A worker that dies mid-mail (the OOM killer, a segfault, a stray signal) costs one
    retry on a fresh worker; dying again, that mail alone becomes a stand-in and the next
    mail gets a fresh worker."""

    async def kill_the_worker(seen: set[int]) -> None:
        def fresh() -> list[asyncio.subprocess.Process]:
            return [w.process for w in pool._all if w.process.pid not in seen]

        await until(fresh, 10, "a fresh worker")
        process = fresh()[0]
        await asyncio.sleep(0.3)  # into the slow mail
        seen.add(process.pid)
        os.kill(process.pid, 9)

    wide = EmailSettings(parse_workers=1, max_header_bytes=1024 * 1024)
    async with ParsePool(pool_settings(wide)) as pool:
        slow = asyncio.create_task(pool.parse(SLOW, **KWARGS))
        killed: set[int] = set()
        await kill_the_worker(killed)
        await kill_the_worker(killed)
        with pytest.raises(ParseFailed) as failed:
            await slow
        assert failed.value.reason == "parser_crashed"
        assert pool.replaced == 2
        assert (await pool.parse(good("after-kill"), **KWARGS)).subject == "after-kill"


async def test_a_worker_that_died_idle_costs_no_mail() -> None:
    """systemd's stop signal reaches every process of the unit: a worker that died while
    idle must not turn the next good mail into a stand-in."""
    async with ParsePool(pool_settings(EmailSettings(parse_workers=1))) as pool:
        assert (await pool.parse(good("first"), **KWARGS)).subject == "first"
        (worker,) = pool._all
        os.kill(worker.process.pid, 15)  # ignored: the pool ends workers by closing stdin
        os.kill(worker.process.pid, 9)
        async with asyncio.timeout(10):
            await worker.process.wait()  # dead before the next mail
        assert (await pool.parse(good("second"), **KWARGS)).subject == "second"


async def test_a_cancelled_parse_leaves_no_worker_in_an_unknown_state() -> None:
    wide = EmailSettings(parse_workers=1, max_header_bytes=1024 * 1024)
    async with ParsePool(pool_settings(wide)) as pool:
        slow = asyncio.create_task(pool.parse(SLOW, **KWARGS))
        await asyncio.sleep(0.5)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        assert pool.replaced == 1
        assert (await pool.parse(good("after-cancel"), **KWARGS)).subject == "after-cancel"


def test_a_stand_in_for_every_hostile_class_validates() -> None:
    for tag, raw in every_class():
        message = stand_in(
            raw, mailbox="s", recipient=None, locator={}, reason="too_deep", detail="d"
        )
        assert message.sender.address == SENDER, tag


def test_a_stand_in_never_fails_whatever_the_scan_read() -> None:
    """A From address past the schema's limit made the stand-in itself raise, and the
    whole batch (good mail included) was retried for ever."""
    raw = (
        b"From: <"
        + b"a" * 600
        + b"@attacker.example>\r\nMessage-ID: <"
        + b"i" * 600
        + b"@x>\r\nSubject: long\r\n\r\n"
    )
    message = stand_in(raw, mailbox="s", recipient=None, locator={}, reason="r", detail="d")
    assert message.meta["unparsed"] is True
    assert len(message.sender.address) <= 254 or message.sender.address == "unknown@invalid"


def test_decoy_boundary_parameters_do_not_hide_nesting() -> None:
    """A boundary named in another header at each level must not let nesting through."""
    out = [b"From: m@attacker.example\r\n"]
    for level in range(100):
        out.append(
            b'Content-Type: multipart/mixed; boundary="b%d"\r\nX-D: boundary=z%d\r\n\r\n--b%d\r\n'
            % (level, level, level)
        )
    out.append(b"Content-Type: text/plain\r\n\r\ndeep\r\n")
    reason = precheck(b"".join(out), DEFAULT_LIMITS)
    assert (reason or "").startswith("too_deep")
    cr_only = hostile_mail.nested_multipart("cr", 100).replace(b"\r\n", b"\r")
    assert (precheck(cr_only, DEFAULT_LIMITS) or "").startswith("too_deep")
