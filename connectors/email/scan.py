"""Bounded, dumb reading of a raw mail, for what the stdlib parser must never see.

Sole purpose (issue 13): a mail's cost is known before ``email.message_from_bytes`` is
called, and a mail that cannot or must not be parsed still keeps its sender, recipient,
Message-ID and Subject. Everything here is linear in the bytes it reads, reads at most
``SCAN_HEAD`` bytes of header for the stand-in, and never raises on any input.

- ``precheck`` finds the limits a mail trips (header block size, RFC 2047 encoded words,
  MIME nesting depth, part count) with regular expressions over the bytes: the stdlib
  header parser grows quadratically in encoded words (85 KB of them took 250 MB) and a
  multipart nested 900 deep took 22 s of CPU.
- ``scan_head`` reads the few headers a stand-in needs from the unfolded header block,
  each value cut to ``VALUE_MAX`` characters before anything decodes it.
"""

import base64
import quopri
import re
from dataclasses import dataclass

from ingest.identities import InvalidIdentity, normalise_email

#: header bytes the stand-in's scan reads; a From past this is not looked for
SCAN_HEAD = 64 * 1024
#: characters of one header value the scan keeps before decoding it
VALUE_MAX = 2048
#: encoded words the scan decodes in one value; the rest stay as written
WORDS_MAX = 40
#: RFC 5321 section 4.5.3.1.3: a path is at most 256 octets with its angle brackets
MAX_ADDRESS = 254
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")
_ENCODED_WORD = re.compile(rb"=\?[^?\s]{1,75}\?[bBqQ]\?")
_ENCODED_WORD_TEXT = re.compile(r"=\?([^?\s]{1,75})\?([bBqQ])\?([^?\s]*)\?=")
#: a delimiter line (RFC 2046 section 5.1.1: a boundary is at most 70 characters; a line
#: ends at CR or LF, as the stdlib reads it) or a boundary parameter, RFC 2231 ``*0`` form
#: included, in document order; possessive, so no input makes the scan backtrack
_MIME_MARK = re.compile(
    rb"(?:\A|(?<=[\r\n]))--([^\r\n]{1,200}+)(?=[\r\n]|\Z)"
    rb'|(?i:boundary)(?:\*0?\*?)?[ \t]*+=[ \t]*+(?:"([^"\r\n]{1,200}+)"|([^;\s]{1,200}+))'
)
_FIELD = re.compile(rb"(?m)^([!-9;-~]{1,76})[ \t]*:")
_ADDRESS = re.compile(r"[^\s<>()\"',;:@]+@[^\s<>()\"',;:@]+\.[^\s<>()\"',;:@]+")
_MSG_ID = re.compile(r"<([^<>\s]{1,998})>")
#: charsets the scan decodes encoded words with: what mail really uses, nothing costly
_SCAN_CHARSETS = re.compile(
    r"^(utf-?8|us-ascii|iso-8859-\d{1,2}|windows-125\d|cp125\d|koi8-[ru]|gb2312|gbk|big5"
    r"|shift_jis|euc-jp|euc-kr|iso-2022-jp)$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Limits:
    """What one mail may cost before the stdlib parser sees it (``EmailSettings``)."""

    max_header_bytes: int
    max_encoded_words: int
    max_mime_depth: int
    max_parts: int


@dataclass(frozen=True)
class Head:
    """What a bounded scan could read of a mail's header block; None where it could not."""

    sender: str | None
    sender_name: str | None
    message_id: str | None
    subject: str | None
    in_reply_to: str | None


def header_block(raw: bytes, limit: int) -> tuple[bytes, bool]:
    """The header block (without its blank line) within ``limit`` bytes, and whether it
    ended there; a mail whose header block runs on is cut at ``limit``."""
    end = _END_OF_HEAD.search(raw, 0, limit + 4)
    if end is None:
        return raw[:limit], len(raw) <= limit
    return raw[: end.start()], True


def precheck(raw: bytes, limits: Limits) -> str | None:
    """The first limit ``raw`` trips, as ``code: detail``; None when the parser may have it."""
    head, ended = header_block(raw, limits.max_header_bytes)
    if not ended:
        return f"header_too_large: header block over {limits.max_header_bytes} bytes"
    words = _count(_ENCODED_WORD, raw, limits.max_encoded_words)
    if words > limits.max_encoded_words:
        return f"too_many_encoded_words: over {limits.max_encoded_words} RFC 2047 encoded words"
    return _mime_structure(raw, limits)


def _count(pattern: re.Pattern[bytes], data: bytes, limit: int) -> int:
    """Matches of ``pattern``, counting no further than ``limit + 1``."""
    found = 0
    for _ in pattern.finditer(data):
        found += 1
        if found > limit:
            break
    return found


def _mime_structure(raw: bytes, limits: Limits) -> str | None:
    """Nesting depth and part count from boundary parameters and delimiter lines alone.

    A declared boundary opens a level at its first delimiter line; its closing delimiter
    (or a delimiter of a level further out) closes it. Lines naming no open boundary are
    body text and ignored, so text that merely starts with ``--`` costs nothing.
    """
    stack: list[bytes] = []
    declared: set[bytes] = set()  # boundaries named by a header, not yet opened
    parts = 0
    for mark in _MIME_MARK.finditer(raw):
        delimiter, quoted, bare = mark.groups()
        if delimiter is None:
            declared.add((quoted or bare or b"").strip())
            if len(declared) > limits.max_parts:
                return f"too_many_parts: over {limits.max_parts} MIME boundaries"
            continue
        name = delimiter.rstrip(b" \t")
        if name.endswith(b"--") and name[:-2] in stack:
            del stack[stack.index(name[:-2]) :]
            continue
        if name in stack:
            del stack[stack.index(name) + 1 :]
        elif name in declared:
            stack.append(name)
            declared.discard(name)
            if len(stack) > limits.max_mime_depth:
                return f"too_deep: MIME nesting over {limits.max_mime_depth} levels"
        else:
            continue
        parts += 1
        if parts > limits.max_parts:
            return f"too_many_parts: over {limits.max_parts} MIME parts"
    return None


def scan_head(raw: bytes) -> Head:
    """From, Message-ID, Subject and In-Reply-To, read without the stdlib parser."""
    head, _ = header_block(raw, SCAN_HEAD)
    fields: dict[str, str] = {}
    for name, value in _fields(head):
        fields.setdefault(name, value)
    sender, sender_name = _sender(fields.get("from"))
    subject = fields.get("subject")
    if subject is not None:
        subject = " ".join(decode_words(subject).split())[:998] or None
    return Head(
        sender=sender,
        sender_name=sender_name,
        message_id=_first_id(fields.get("message-id")),
        subject=subject,
        in_reply_to=_first_id(fields.get("in-reply-to")),
    )


_WANTED = frozenset({"from", "message-id", "subject", "in-reply-to"})


def _fields(head: bytes) -> list[tuple[str, str]]:
    """The wanted fields, unfolded (RFC 5322 section 2.2.3), each cut to ``VALUE_MAX``."""
    out: list[tuple[str, str]] = []
    starts = list(_FIELD.finditer(head))
    for index, match in enumerate(starts):
        name = match.group(1).decode("ascii").lower()
        if name not in _WANTED:
            continue
        end = starts[index + 1].start() if index + 1 < len(starts) else len(head)
        value = head[match.end() : min(end, match.end() + 4 * VALUE_MAX)]
        text = value.decode("utf-8", "replace")
        out.append((name, " ".join(text.split())[:VALUE_MAX]))
    return out


def decode_words(value: str) -> str:
    """RFC 2047 encoded words in ``value`` decoded, at most ``WORDS_MAX`` of them, and only
    in charsets mail really uses; a word that does not decode stays as written."""
    decoded = 0

    def one(match: re.Match[str]) -> str:
        nonlocal decoded
        charset, kind, text = match.groups()
        label = charset.split("*", 1)[0]  # RFC 2231 language suffix
        if decoded >= WORDS_MAX or not _SCAN_CHARSETS.match(label):
            return match.group(0)
        decoded += 1
        try:
            if kind in "bB":
                data = base64.b64decode(text + "=" * (-len(text) % 4))
            else:
                data = quopri.decodestring(text.replace("_", " ").encode("ascii"), header=True)
            return data.decode(label, "replace")
        except (ValueError, LookupError):
            return match.group(0)

    joined = re.sub(r"(\?=)\s+(=\?)", r"\1\2", value)  # space between words is not text
    return _ENCODED_WORD_TEXT.sub(one, joined)


def _sender(value: str | None) -> tuple[str | None, str | None]:
    """The first address in ``From`` that normalises, and the display name before it."""
    if not value:
        return None, None
    for match in _ADDRESS.finditer(value):
        if len(match.group(0)) > MAX_ADDRESS:
            continue
        try:
            address = normalise_email(match.group(0).strip("<>."))
        except InvalidIdentity:
            continue
        before = value[: match.start()].strip().strip("<").strip()
        name = " ".join(decode_words(before).strip('"').split())[:200] or None
        return address, name
    return None, None


def _first_id(value: str | None) -> str | None:
    if not value:
        return None
    match = _MSG_ID.search(value)
    if match:
        return match.group(1)
    word = value.split()[0].strip("<>") if value.split() else ""
    return word[:998] or None
